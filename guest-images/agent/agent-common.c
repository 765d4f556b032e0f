// SPDX-License-Identifier: GPL-2.0
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>

#include "agent-common.h"

void agent_vfail(int status, const char *prefix, const char *suffix, const char *fmt, va_list ap)
{
	char buf[1024];
	char *p;

	vsnprintf(buf, sizeof(buf), fmt, ap);
	for (p = buf; *p; p++) /* the controller reads exactly one line */
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	fflush(stdout);
	fprintf(stderr, "vmlab-guest-agent: %s%s%s\n", prefix, buf, suffix);
	exit(status);
}

void agent_json_str(FILE *f, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;

	if (!s) {
		fputs("null", f);
		return;
	}
	fputc('"', f);
	for (; *p; p++) {
		switch (*p) {
		case '"': fputs("\\\"", f); break;
		case '\\': fputs("\\\\", f); break;
		case '\n': fputs("\\n", f); break;
		case '\r': fputs("\\r", f); break;
		case '\t': fputs("\\t", f); break;
		default:
			if (*p < 0x20)
				fprintf(f, "\\u%04x", *p);
			else
				fputc(*p, f);
		}
	}
	fputc('"', f);
}

int agent_parse_u64(const char *s, uint64_t *v)
{
	char *end;

	/* digits first: strtoull skips blanks and takes a sign, so " -1" was 2^64 - 1 */
	if (!s || *s < '0' || *s > '9')
		return -1;
	errno = 0;
	*v = strtoull(s, &end, 0);
	if (errno || *end)
		return -2;
	return 0;
}

int agent_mount_debugfs(void)
{
	if (access(AGENT_PAT_LIST, F_OK) == 0)
		return 0;
	if (mount("debugfs", AGENT_DEBUGFS, "debugfs", 0, NULL) && errno != EBUSY)
		return -1;
	return 0;
}

int agent_parse_pat_line(const char *line, unsigned long long *s, unsigned long long *e,
			 const char **type)
{
	const char *p = strstr(line, "[mem ");
	const char *q;
	char *end;

	if (!p)
		return -1;
	p += 5;
	*s = strtoull(p, &end, 16);
	if (*end != '-')
		return -1;
	*e = strtoull(end + 1, &end, 16);
	if (*end != ']')
		return -1;
	q = end + 1;
	while (*q == ' ' || *q == '\t')
		q++;
	*type = q;
	return 0;
}

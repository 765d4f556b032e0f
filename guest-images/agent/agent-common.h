/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Helpers shared by the guest agent's commands (vmlab-guest-agent.c) and its
 * virtio-gpu commands (gpu.c): one-line errors, JSON strings, number parsing,
 * debugfs and the x86 PAT memtype list.
 */
#ifndef VMLAB_AGENT_COMMON_H
#define VMLAB_AGENT_COMMON_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#define AGENT_DEBUGFS "/sys/kernel/debug"
#define AGENT_PAT_LIST AGENT_DEBUGFS "/x86/pat_memtype_list"

/* "vmlab-guest-agent: <prefix><message><suffix>" on one line of stderr, then exit(status). */
void __attribute__((noreturn)) agent_vfail(int status, const char *prefix, const char *suffix,
					   const char *fmt, va_list ap);

/* s as a JSON string (NULL -> null). */
void agent_json_str(FILE *f, const char *s);

/* 0: *v parsed (decimal/hex/octal); -1: missing or negative; -2: not a whole number. */
int agent_parse_u64(const char *s, uint64_t *v);

/* Mount debugfs unless the PAT list is already visible: 0, or -1 with errno set. */
int agent_mount_debugfs(void);

/* Parse "PAT: [mem 0xS-0xE] type": 0 with *s, *e (exclusive) and *type, else -1. */
int agent_parse_pat_line(const char *line, unsigned long long *s, unsigned long long *e,
			 const char **type);

#endif

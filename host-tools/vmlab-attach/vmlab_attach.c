// SPDX-License-Identifier: GPL-2.0
/*
 * vmlab-attach: the lab side's way into two long-lived things over a unix socket, for
 * the price of an exec instead of a Python start (0.5-1.7 s under the TCG lab).
 *
 *   vmlab-attach agent SOCK   hand this process's stdin, stdout and stderr (the SSH
 *                             channel's pipes) to the host agent's fork server at SOCK
 *                             (hostagent.py zygote), which forks one agent for them;
 *                             wait for that agent to end and exit with its status.
 *   vmlab-attach relay SOCK   copy stdin to SOCK and SOCK to stdout until either side
 *                             ends (a QMP socket reached through the lab's SSH).
 *
 * The agent is a process of its own that holds the channel's pipes itself, so it sees
 * the controller's EOF exactly as an agent started by the exec would, and its exit is a
 * process exit: every buffer fd, mapping and socket of the run goes with it.
 *
 * Exit 75 (EX_TEMPFAIL) from "agent" means no agent was started for this channel and
 * nothing was written to it: the caller starts one itself.  Anything else is the agent's
 * exit status; 137 when it ended without giving one (killed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define EX_NO_AGENT 75
#define EX_KILLED 137
#define START_TIMEOUT_MS 30000
/* one message: 'A', then the VMLAB_* environment entries, each NUL-terminated */
#define MAX_MSG 8192

extern char **environ;

static int connect_unix(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int s, e;

	if (strlen(path) >= sizeof(a.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(a.sun_path, path);
	s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		e = errno;
		close(s);
		errno = e;
		return -1;
	}
	return s;
}

/* one byte, retried on EINTR; 1 read, 0 EOF, -1 error */
static int read_byte(int s, unsigned char *b)
{
	ssize_t n;

	do
		n = read(s, b, 1);
	while (n < 0 && errno == EINTR);
	return n < 0 ? -1 : (int)n;
}

static int agent(const char *path)
{
	static char msg[MAX_MSG];
	int fds[3] = { 0, 1, 2 };
	union {
		char buf[CMSG_SPACE(sizeof(fds))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov;
	struct msghdr m = { 0 };
	struct cmsghdr *h;
	struct pollfd p;
	unsigned char b;
	size_t n = 0, l;
	int s, r;

	msg[n++] = 'A';
	for (char **e = environ; *e; e++) {
		if (strncmp(*e, "VMLAB_", 6))
			continue;
		l = strlen(*e) + 1;
		if (n + l > sizeof(msg)) {
			fprintf(stderr, "vmlab-attach: VMLAB_* environment over %d bytes\n", MAX_MSG);
			return EX_NO_AGENT;
		}
		memcpy(msg + n, *e, l);
		n += l;
	}
	s = connect_unix(path);
	if (s < 0) {
		fprintf(stderr, "vmlab-attach: %s: %s; starting the agent itself\n", path, strerror(errno));
		return EX_NO_AGENT;
	}
	iov.iov_base = msg;
	iov.iov_len = n;
	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	m.msg_control = ctl.buf;
	m.msg_controllen = sizeof(ctl.buf);
	h = CMSG_FIRSTHDR(&m);
	h->cmsg_level = SOL_SOCKET;
	h->cmsg_type = SCM_RIGHTS;
	h->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(h), fds, sizeof(fds));
	if (sendmsg(s, &m, MSG_NOSIGNAL) != (ssize_t)n) {
		fprintf(stderr, "vmlab-attach: sending to %s: %s; starting the agent itself\n",
			path, strerror(errno));
		return EX_NO_AGENT;
	}
	/* 'S' once the forked agent owns the pipes, before it writes anything to them: EOF
	 * before it means no agent ran for this channel.  A server that says nothing for
	 * START_TIMEOUT_MS is an error, not a fallback: its agent may still start and read
	 * the pipes, and two agents must never share them. */
	p.fd = s;
	p.events = POLLIN;
	do
		r = poll(&p, 1, START_TIMEOUT_MS);
	while (r < 0 && errno == EINTR);
	if (r == 0) {
		fprintf(stderr, "vmlab-attach: %s started no agent in %d ms\n", path, START_TIMEOUT_MS);
		return 1;
	}
	r = read_byte(s, &b);
	if (r != 1 || b != 'S') {
		fprintf(stderr, "vmlab-attach: %s started no agent; starting the agent itself\n", path);
		return EX_NO_AGENT;
	}
	/* the agent holds the pipes now; ours would only delay the controller's EOF */
	close(0);
	close(1);
	r = read_byte(s, &b);
	if (r != 1) {
		fprintf(stderr, "vmlab-attach: the host agent ended without a status (killed?)\n");
		return EX_KILLED;
	}
	return b;
}

static int relay(const char *path)
{
	static char buf[65536];
	struct pollfd p[2];
	ssize_t n, w, off;
	int s, from, to;

	s = connect_unix(path);
	if (s < 0) {
		fprintf(stderr, "vmlab-attach: %s: %s\n", path, strerror(errno));
		return 1;
	}
	p[0].fd = 0;
	p[1].fd = s;
	p[0].events = p[1].events = POLLIN;
	for (;;) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		for (int i = 0; i < 2; i++) {
			if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			from = p[i].fd;
			to = i == 0 ? s : 1;
			n = read(from, buf, sizeof(buf));
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				return 0;	/* either side ended: so does the relay */
			for (off = 0; off < n; off += w) {
				w = i == 0 ? send(to, buf + off, n - off, MSG_NOSIGNAL)
					   : write(to, buf + off, n - off);
				if (w < 0 && errno == EINTR) {
					w = 0;
					continue;
				}
				if (w <= 0)
					return 0;
			}
		}
	}
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "agent"))
		return agent(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "relay"))
		return relay(argv[2]);
	fprintf(stderr, "usage: vmlab-attach agent|relay SOCK\n");
	return 2;
}

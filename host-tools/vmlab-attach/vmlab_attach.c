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
 * process exit: every buffer fd, mapping and socket of the run goes with it.  This exits
 * only once that process has exited (a pidfd of it, taken before the agent may run), as
 * sshd's wait for an agent it started would: the controller's "the agent ended" means
 * its files and mappings are gone.
 *
 * Exit 75 (EX_TEMPFAIL) from "agent" means no agent was started for this channel and
 * nothing was written to it: the caller starts one itself.  Anything else is the agent's
 * exit status; 137 when it ended without giving one (killed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define EX_NO_AGENT 75
#define EX_KILLED 137
#define START_TIMEOUT_MS 30000
#define CONNECT_TIMEOUT_S 10
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
	/* a wedged server with a full backlog: connect gives up (AF_UNIX honours it) */
	struct timeval tv = { .tv_sec = CONNECT_TIMEOUT_S };
	if (setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0 ||
	    connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		e = errno;
		close(s);
		errno = e;
		return -1;
	}
	return s;
}

/* exactly len bytes, retried on EINTR; len read, 0 EOF first, -1 error or EOF midway */
static ssize_t read_full(int s, void *buf, size_t len)
{
	size_t got = 0;
	ssize_t n;

	while (got < len) {
		n = read(s, (char *)buf + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == ECONNRESET && !got)
			return 0;	/* a server gone with our message unread: an EOF */
		if (n < 0)
			return -1;
		if (n == 0)
			return got ? -1 : 0;
		got += n;
	}
	return got;
}

/* until the process pid has exited (its files and mappings released).  With a pidfd,
 * as long as that takes, as sshd waits for an agent it started; without one (before
 * Linux 5.3, or an agent that died as it was taken) the pid may be reused, so at most
 * NOPIDFD_WAIT_MS: the server's children are reaped at their exit. */
#define NOPIDFD_WAIT_MS 10000
static void wait_exited(pid_t pid, int pidfd)
{
	struct pollfd p = { .fd = pidfd, .events = POLLIN };
	struct timespec ten_ms = { 0, 10 * 1000 * 1000 };

	if (pidfd >= 0) {
		while (poll(&p, 1, -1) < 0 && errno == EINTR)
			;
		close(pidfd);
		return;
	}
	for (int i = 0; i < NOPIDFD_WAIT_MS / 10 && (kill(pid, 0) == 0 || errno != ESRCH); i++)
		nanosleep(&ten_ms, NULL);
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
	struct {
		char s;
		uint32_t pid;
	} __attribute__((packed)) hello;
	ssize_t sent;
	size_t n = 0, l;
	int s, r, pidfd;

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
	sent = sendmsg(s, &m, MSG_NOSIGNAL);
	if (sent < 0) {
		fprintf(stderr, "vmlab-attach: sending to %s: %s; starting the agent itself\n",
			path, strerror(errno));
		return EX_NO_AGENT;
	}
	if (sent != (ssize_t)n) {
		/* the fds went with the first byte: an agent may start, so no second one */
		fprintf(stderr, "vmlab-attach: %s took %zd of %zu bytes\n", path, sent, n);
		return 1;
	}
	/* 'S' and the agent's pid once it owns the pipes, before it reads or writes them:
	 * EOF before it means no agent ran for this channel.  A server that says nothing for
	 * START_TIMEOUT_MS is an error, not a fallback: its agent may still start and read
	 * the pipes, and two agents must never share them. */
	p.fd = s;
	p.events = POLLIN;
	do
		r = poll(&p, 1, START_TIMEOUT_MS);
	while (r < 0 && errno == EINTR);
	if (r <= 0) {
		fprintf(stderr, "vmlab-attach: %s started no agent in %d ms\n", path, START_TIMEOUT_MS);
		return 1;
	}
	r = read_full(s, &hello, sizeof(hello));
	if (r == 0) {
		fprintf(stderr, "vmlab-attach: %s started no agent; starting the agent itself\n", path);
		return EX_NO_AGENT;
	}
	if (r < 0 || hello.s != 'S' || hello.pid == 0) {
		fprintf(stderr, "vmlab-attach: %s: a garbled start\n", path);
		return 1;
	}
	/* the agent waits for this ack and sends nothing before it, holding the socket
	 * until its exit: a socket still quiet after the pidfd is taken means the pidfd
	 * names the agent, not a process that took its pid after it died */
	pidfd = syscall(SYS_pidfd_open, (pid_t)hello.pid, 0);
	p.fd = s;
	p.events = POLLIN;
	if (pidfd >= 0 && poll(&p, 1, 0) != 0) {
		close(pidfd);
		pidfd = -1;
	}
	if (send(s, "A", 1, MSG_NOSIGNAL) != 1) {
		fprintf(stderr, "vmlab-attach: %s: %s\n", path, strerror(errno));
		wait_exited(hello.pid, pidfd);
		return 1;
	}
	/* the agent holds the pipes now; ours would only delay the controller's EOF */
	close(0);
	close(1);
	r = read_full(s, &b, 1);
	wait_exited(hello.pid, pidfd);
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
			if (p[i].revents & POLLNVAL)
				return 1;
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

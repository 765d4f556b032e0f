// SPDX-License-Identifier: GPL-2.0
/*
 * vmlab-hwtrace: a TCG plugin for the OUTER QEMU (the one that runs the lab host).
 *
 * The outer QEMU translates every access of the nested guest through the guest's page
 * tables and KVM's nested page table, so the physical address a plugin gets for a guest
 * load or store is the lab-host page that access really hit: the hardware's view of
 * KVM's NPT. The controller tells us which lab-host pages are the buffer's retired (OLD)
 * and current (NEW) pages and in which virtual range the guest agent maps the buffer;
 * we count, per epoch, the accesses from that range that hit each set.
 *
 * Fast path: one range check on the access's virtual address. The guest agent maps the
 * buffer at a fixed address that nothing else in the lab uses, and lab-kernel accesses
 * (the exporter's copies and stamps) are outside that range by construction.
 *
 * Control: a UNIX stream socket (mode 0600, path from the "sock=" argument), one
 * command per line, one reply line per command:
 *   range LO HI            virtual range [LO, HI) of the guest agent's mapping (hex)
 *   set old|new PFN...     replace the OLD or NEW pfn set (hex pfns, any order)
 *   epoch N                start epoch N: counters and hit records reset
 *   sample K               also record the next K in-range accesses, whatever page
 *   dump                   JSON with this epoch's counters: hits per set, and every
 *                          retired-page hit by guest PC (count, vaddr range), the first
 *                          MAX_HITS of them one by one
 *   hello                  JSON with the plugin's ABI and the QEMU plugin API version
 *
 * Physical addresses: QEMU 7.2's qemu_plugin_hwaddr_phys_addr() returns the RAM block
 * offset plus the region's address, which equals the guest-physical address for RAM
 * below the PCI hole. The controller refuses the oracle for labs whose RAM reaches above
 * it (see vmlab/hwtrace.py).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define HWTRACE_ABI 1
#define MAX_HITS 64        /* retired-page hit records kept per epoch */
#define MAX_PCS 64         /* distinct guest PCs whose retired-page hits are counted */
#define MAX_SAMPLES 4096   /* in-range sample records kept per epoch */
#define MAX_LINE (8u << 20) /* a 64 MiB buffer's pfn list is ~300 KiB of hex */
#define PAGE_SHIFT 12

struct pfnset {
	uint64_t *pfn;     /* sorted */
	uint64_t *hits;    /* per pfn, this epoch */
	size_t n;
};

struct hit {
	uint64_t pfn, vaddr, pc, ns;
	int store;
};

/* every retired-page hit, by the instruction that made it */
struct pcstat {
	uint64_t pc, count, vmin, vmax;
};

static struct {
	pthread_mutex_t lock;  /* everything below except the range */
	struct pfnset set[2];  /* 0 OLD, 1 NEW */
	uint64_t epoch, epoch_start_ns;
	uint64_t in_range, other, io, nohw;
	uint64_t first_old_ns;  /* 0: none */
	struct hit hits[MAX_HITS];
	size_t nhits;
	struct pcstat pcs[MAX_PCS];
	size_t npcs;
	uint64_t pcs_dropped;  /* retired-page hits from PCs beyond MAX_PCS */
	struct hit samples[MAX_SAMPLES];
	size_t nsamples, want_samples;
} st = { .lock = PTHREAD_MUTEX_INITIALIZER };

/* read without the lock on every access: the fast path */
static _Atomic uint64_t va_lo, va_hi;

static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int listen_fd = -1;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static long find(const struct pfnset *s, uint64_t pfn)
{
	size_t lo = 0, hi = s->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (s->pfn[mid] == pfn)
			return (long)mid;
		if (s->pfn[mid] < pfn)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

static void vcpu_mem(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr,
		     void *udata)
{
	struct qemu_plugin_hwaddr *hw;
	uint64_t pfn, ns;
	long i;
	int which = -1;

	(void)vcpu;
	if (vaddr < atomic_load_explicit(&va_lo, memory_order_relaxed) ||
	    vaddr >= atomic_load_explicit(&va_hi, memory_order_relaxed))
		return;
	hw = qemu_plugin_get_hwaddr(info, vaddr);
	pthread_mutex_lock(&st.lock);
	st.in_range++;
	if (!hw) {
		st.nohw++;
		goto out;
	}
	if (qemu_plugin_hwaddr_is_io(hw)) {
		st.io++;
		goto out;
	}
	pfn = qemu_plugin_hwaddr_phys_addr(hw) >> PAGE_SHIFT;
	ns = now_ns() - st.epoch_start_ns;
	if (st.nsamples < st.want_samples && st.nsamples < MAX_SAMPLES)
		st.samples[st.nsamples++] = (struct hit){ pfn, vaddr, (uint64_t)(uintptr_t)udata, ns,
							  qemu_plugin_mem_is_store(info) };
	if ((i = find(&st.set[0], pfn)) >= 0)
		which = 0;
	else if ((i = find(&st.set[1], pfn)) >= 0)
		which = 1;
	if (which < 0) {
		st.other++;
		goto out;
	}
	st.set[which].hits[i]++;
	if (which == 0) {
		uint64_t pc = (uint64_t)(uintptr_t)udata;
		size_t k;

		for (k = 0; k < st.npcs && st.pcs[k].pc != pc; k++)
			;
		if (k == st.npcs && k < MAX_PCS)
			st.pcs[st.npcs++] = (struct pcstat){ pc, 0, vaddr, vaddr };
		if (k < st.npcs) {
			st.pcs[k].count++;
			if (vaddr < st.pcs[k].vmin)
				st.pcs[k].vmin = vaddr;
			if (vaddr > st.pcs[k].vmax)
				st.pcs[k].vmax = vaddr;
		} else {
			st.pcs_dropped++;
		}
		if (!st.first_old_ns)
			st.first_old_ns = ns ? ns : 1;
		if (st.nhits < MAX_HITS)
			st.hits[st.nhits++] = (struct hit){ pfn, vaddr, (uint64_t)(uintptr_t)udata, ns,
							    qemu_plugin_mem_is_store(info) };
	}
out:
	pthread_mutex_unlock(&st.lock);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
	size_t n = qemu_plugin_tb_n_insns(tb), i;

	(void)id;
	for (i = 0; i < n; i++) {
		struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);

		/* the guest PC rides along as userdata: hit records name the instruction */
		qemu_plugin_register_vcpu_mem_cb(insn, vcpu_mem, QEMU_PLUGIN_CB_NO_REGS,
						 QEMU_PLUGIN_MEM_RW,
						 (void *)(uintptr_t)qemu_plugin_insn_vaddr(insn));
	}
}

/* ---------------------------------------------------------------------------------- */
/* control socket                                                                       */

/* a whole token of digits in @base (10 or 16) without sign, prefix or blanks */
static int parse_u64(const char *tok, int base, uint64_t *out)
{
	const char *digits = base == 16 ? "0123456789abcdefABCDEF" : "0123456789";
	char *end;

	if (!*tok || strspn(tok, digits) != strlen(tok) || strlen(tok) > (base == 16 ? 16 : 19))
		return -1;
	errno = 0;
	*out = strtoull(tok, &end, base);
	return errno || *end ? -1 : 0;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* parse "PFN PFN ..." (hex); 0 on success, -1 on a bad token or no memory */
static int parse_set(char *s, struct pfnset *out)
{
	size_t cap = 64, n = 0;
	uint64_t *v = malloc(cap * sizeof(*v));
	char *tok, *save = NULL;

	if (!v)
		return -1;
	for (tok = strtok_r(s, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
		uint64_t x;

		if (parse_u64(tok, 16, &x))
			goto bad;
		if (n == cap) {
			uint64_t *nv = realloc(v, 2 * cap * sizeof(*v));

			if (!nv)
				goto bad;
			v = nv;
			cap *= 2;
		}
		v[n++] = x;
	}
	qsort(v, n, sizeof(*v), cmp_u64);
	out->pfn = v;
	out->hits = calloc(n ? n : 1, sizeof(uint64_t));
	out->n = n;
	if (!out->hits)
		goto bad;
	return 0;
bad:
	free(v);
	return -1;
}

static size_t set_pages_hit(const struct pfnset *s, uint64_t *total)
{
	size_t i, pages = 0;

	*total = 0;
	for (i = 0; i < s->n; i++) {
		*total += s->hits[i];
		pages += s->hits[i] != 0;
	}
	return pages;
}

/* caller holds st.lock; returns a malloc'd JSON line */
static char *dump_json(void)
{
	size_t cap = 4096 + (st.nhits + st.nsamples + st.npcs) * 160, len = 0, i;
	char *b = malloc(cap);
	uint64_t oh, nh;
	size_t op = set_pages_hit(&st.set[0], &oh), np = set_pages_hit(&st.set[1], &nh);

	if (!b)
		return NULL;
#define OUT(...) (len += (size_t)snprintf(b + len, cap - len, __VA_ARGS__))
	OUT("{\"epoch\":%" PRIu64 ",\"va\":[%" PRIu64 ",%" PRIu64 "],\"in_range\":%" PRIu64
	    ",\"io\":%" PRIu64 ",\"no_hwaddr\":%" PRIu64 ",\"other\":%" PRIu64,
	    st.epoch, (uint64_t)atomic_load(&va_lo), (uint64_t)atomic_load(&va_hi), st.in_range,
	    st.io, st.nohw, st.other);
	OUT(",\"old\":{\"pages\":%zu,\"hits\":%" PRIu64 ",\"pages_hit\":%zu}", st.set[0].n, oh, op);
	OUT(",\"new\":{\"pages\":%zu,\"hits\":%" PRIu64 ",\"pages_hit\":%zu}", st.set[1].n, nh, np);
	OUT(",\"first_old_hit_ns\":");
	if (st.first_old_ns)
		OUT("%" PRIu64, st.first_old_ns);
	else
		OUT("null");
	OUT(",\"old_hits_by_pc\":[");
	for (i = 0; i < st.npcs; i++)
		OUT("%s{\"pc\":%" PRIu64 ",\"hits\":%" PRIu64 ",\"vaddr_min\":%" PRIu64
		    ",\"vaddr_max\":%" PRIu64 "}", i ? "," : "", st.pcs[i].pc, st.pcs[i].count,
		    st.pcs[i].vmin, st.pcs[i].vmax);
	OUT("],\"old_hits_other_pcs\":%" PRIu64, st.pcs_dropped);
	for (int pass = 0; pass < 2; pass++) {
		const struct hit *h = pass ? st.samples : st.hits;
		size_t n = pass ? st.nsamples : st.nhits;

		OUT(",\"%s\":[", pass ? "samples" : "old_hits");
		for (i = 0; i < n; i++)
			OUT("%s{\"pfn\":%" PRIu64 ",\"vaddr\":%" PRIu64 ",\"pc\":%" PRIu64
			    ",\"ns\":%" PRIu64 ",\"store\":%s}", i ? "," : "", h[i].pfn, h[i].vaddr,
			    h[i].pc, h[i].ns, h[i].store ? "true" : "false");
		OUT("]");
	}
	OUT("}\n");
#undef OUT
	return b;
}

static void reset_epoch(uint64_t n)
{
	for (int k = 0; k < 2; k++)
		if (st.set[k].n)
			memset(st.set[k].hits, 0, st.set[k].n * sizeof(uint64_t));
	st.epoch = n;
	st.epoch_start_ns = now_ns();
	st.in_range = st.other = st.io = st.nohw = 0;
	st.first_old_ns = 0;
	st.nhits = st.nsamples = st.npcs = 0;
	st.pcs_dropped = 0;
}

static char *handle(char *line)
{
	char *reply = NULL;

	if (!strncmp(line, "range ", 6)) {
		uint64_t lo, hi;
		char *save = NULL, *a = strtok_r(line + 6, " ", &save), *b = strtok_r(NULL, " ", &save);

		if (!a || !b || strtok_r(NULL, " ", &save) || parse_u64(a, 16, &lo) ||
		    parse_u64(b, 16, &hi) || lo >= hi)
			return strdup("error range wants LO HI in hex, LO < HI\n");
		atomic_store(&va_hi, 0);  /* never a moment with a wider range than asked */
		atomic_store(&va_lo, lo);
		atomic_store(&va_hi, hi);
		return strdup("ok\n");
	}
	if (!strncmp(line, "set old", 7) || !strncmp(line, "set new", 7)) {
		struct pfnset fresh = { 0 };
		int k = line[4] == 'n';

		if (line[7] && line[7] != ' ')
			return strdup("error set wants old|new\n");
		if (parse_set(line + 7, &fresh))
			return strdup("error set: bad hex pfn or out of memory\n");
		pthread_mutex_lock(&st.lock);
		free(st.set[k].pfn);
		free(st.set[k].hits);
		st.set[k] = fresh;
		pthread_mutex_unlock(&st.lock);
		return strdup("ok\n");
	}
	if (!strncmp(line, "epoch ", 6)) {
		uint64_t n;

		if (parse_u64(line + 6, 10, &n))
			return strdup("error epoch wants a decimal number\n");
		pthread_mutex_lock(&st.lock);
		reset_epoch(n);
		pthread_mutex_unlock(&st.lock);
		return strdup("ok\n");
	}
	if (!strncmp(line, "sample ", 7)) {
		uint64_t k;

		if (parse_u64(line + 7, 10, &k))
			return strdup("error sample wants a decimal count\n");
		pthread_mutex_lock(&st.lock);
		st.want_samples = k > MAX_SAMPLES ? MAX_SAMPLES : k;
		pthread_mutex_unlock(&st.lock);
		return strdup("ok\n");
	}
	if (!strcmp(line, "dump")) {
		pthread_mutex_lock(&st.lock);
		reply = dump_json();
		pthread_mutex_unlock(&st.lock);
		return reply ? reply : strdup("error out of memory\n");
	}
	if (!strcmp(line, "hello")) {
		if (asprintf(&reply, "{\"abi\":%d,\"plugin_api\":%d}\n", HWTRACE_ABI,
			     QEMU_PLUGIN_VERSION) < 0)
			return NULL;
		return reply;
	}
	return strdup("error unknown command\n");
}

static int write_all(int fd, const char *s, size_t n)
{
	while (n) {
		ssize_t w = write(fd, s, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		s += w;
		n -= (size_t)w;
	}
	return 0;
}

static void serve(int fd)
{
	size_t cap = 65536, len = 0;
	char *buf = malloc(cap);

	while (buf) {
		char *nl = memchr(buf, '\n', len);

		if (nl) {
			char *reply;

			*nl = 0;
			reply = handle(buf);
			if (!reply || write_all(fd, reply, strlen(reply))) {
				free(reply);
				break;
			}
			free(reply);
			len -= (size_t)(nl + 1 - buf);
			memmove(buf, nl + 1, len);
			continue;
		}
		if (len == cap) {
			char *nb = cap >= MAX_LINE ? NULL : realloc(buf, cap * 2);

			if (!nb) {
				write_all(fd, "error line too long\n", 20);
				break;
			}
			buf = nb;
			cap *= 2;
		}
		ssize_t r = read(fd, buf + len, cap - len);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		len += (size_t)r;
	}
	free(buf);
	close(fd);
}

static void *control_thread(void *arg)
{
	sigset_t all;

	(void)arg;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);  /* QEMU's signals are QEMU's business */
	for (;;) {
		int fd = accept(listen_fd, NULL, NULL);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			return NULL;
		}
		serve(fd);  /* one client at a time: the controller */
	}
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
	(void)id;
	(void)p;
	if (sock_path[0])
		unlink(sock_path);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
					   int argc, char **argv)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	pthread_t t;
	int i;

	if (info->system_emulation == false) {
		fprintf(stderr, "vmlab-hwtrace: needs system emulation\n");
		return -1;
	}
	for (i = 0; i < argc; i++) {
		if (!strncmp(argv[i], "sock=", 5)) {
			if (strlen(argv[i] + 5) >= sizeof(sock_path)) {
				fprintf(stderr, "vmlab-hwtrace: sock= path too long\n");
				return -1;
			}
			strcpy(sock_path, argv[i] + 5);
		} else {
			fprintf(stderr, "vmlab-hwtrace: unknown argument %s\n", argv[i]);
			return -1;
		}
	}
	if (!sock_path[0]) {
		fprintf(stderr, "vmlab-hwtrace: sock=PATH is required\n");
		return -1;
	}
	memcpy(sa.sun_path, sock_path, strlen(sock_path) + 1);
	listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sa, sizeof(sa)) ||
	    /* nobody can connect before listen(), so the mode is set before anyone could */
	    chmod(sock_path, 0600) || listen(listen_fd, 1)) {
		fprintf(stderr, "vmlab-hwtrace: control socket %s: %s\n", sock_path, strerror(errno));
		return -1;
	}
	atomic_store(&va_lo, UINT64_MAX);
	atomic_store(&va_hi, 0);
	reset_epoch(0);
	if (pthread_create(&t, NULL, control_thread, NULL)) {
		fprintf(stderr, "vmlab-hwtrace: cannot start the control thread\n");
		return -1;
	}
	pthread_detach(t);
	qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
	qemu_plugin_register_atexit_cb(id, at_exit, NULL);
	return 0;
}

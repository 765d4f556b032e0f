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
 *   epoch N                start epoch N: every counter and record reset, sets kept
 *   retire T PFN...        the buffer moved at T (CLOCK_MONOTONIC ns, decimal): its pages
 *                          now are PFN...; every NEW pfn not among them becomes OLD from
 *                          T on (a hit on it before T was legitimate: "before_retire").
 *                          Only hits at or after T count against this move. Hits before T
 *                          on pages now current (read after the exporter's swap, before
 *                          this command) count for them; on pages retired by an earlier
 *                          move they stay apart ("before_move": a stale mapping older than
 *                          this move)
 *   sample K               record the first K in-range accesses of each epoch (debug)
 *   dump                   JSON with this epoch's counters: hits per set, and every
 *                          retired-page hit by guest PC (count, vaddr range), the first
 *                          MAX_HITS of them one by one
 *   hello                  JSON with the plugin's ABI and the QEMU plugin API version
 * An epoch is started before a move and read after the guest's read, so no access
 * from the move on is lost; CLOCK_MONOTONIC is the controller's clock too (same host).
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
#include <stdarg.h>
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

#define HWTRACE_ABI 2
#define MAX_HITS 64         /* retired-page hit records kept one by one per epoch */
#define MAX_PCS 64          /* distinct guest PCs whose retired-page hits are counted */
#define MAX_SAMPLES 4096    /* in-range sample records kept per epoch */
#define MAX_LINE (16u << 20)
#define PAGE_SHIFT 12

enum { OLD, NEW };

struct entry {
	uint64_t pfn;
	uint64_t since;         /* OLD only: retired at this CLOCK_MONOTONIC ns (0: always) */
	uint64_t hits;          /* this epoch; for OLD only those at or after @since */
	uint64_t early;         /* OLD only: hits before @since, when it was still current */
	uint64_t prior;         /* OLD only: hits after @since but before this epoch's move */
};

/*
 * Hits on pfns in neither set, per pfn. Between the exporter's swap and the controller's
 * `retire` the guest may already read the new pages, which no set names yet: `retire`
 * credits those to the new set, and only what is left is "other".
 */
struct unknown {
	uint64_t *pfn, *hits;   /* open addressing; pfn UINT64_MAX: empty */
	size_t cap, n;
};

struct pfnset {
	struct entry *e;        /* sorted by pfn */
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

struct range {
	uint64_t lo, hi;
};

static struct {
	pthread_mutex_t lock;   /* everything here; the range is read without it */
	struct pfnset set[2];
	uint64_t epoch, epoch_start_ns;
	uint64_t moved_at;      /* this epoch's `retire` time; UINT64_MAX until then */
	struct unknown unk;
	uint64_t unk_dropped;   /* hits on unknown pfns the table had no room for */
	uint64_t in_range, io, nohw;
	uint64_t first_old_ns;  /* absolute; 0: none */
	struct hit hits[MAX_HITS];
	size_t nhits;
	struct hit others[MAX_HITS];  /* accesses to pages in neither set: each is a question */
	size_t nothers;
	struct pcstat pcs[MAX_PCS];
	size_t npcs;
	uint64_t pcs_dropped;   /* retired-page hits from PCs beyond MAX_PCS */
	struct hit samples[MAX_SAMPLES];
	size_t nsamples, want_samples;
} st = { .lock = PTHREAD_MUTEX_INITIALIZER };

/*
 * The fast path reads one pointer to an immutable pair, so it never sees half of an
 * update. Replaced pairs are not freed (a vCPU may still read one): a few bytes per
 * `range` command, and the controller sends one per run.
 */
static const struct range no_range = { UINT64_MAX, 0 };
static _Atomic(const struct range *) cur_range = &no_range;

static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int listen_fd = -1;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct entry *find(const struct pfnset *s, uint64_t pfn)
{
	size_t lo = 0, hi = s->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (s->e[mid].pfn == pfn)
			return &s->e[mid];
		if (s->e[mid].pfn < pfn)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

/* caller holds st.lock */
static void count_old_hit(uint64_t pfn, uint64_t vaddr, uint64_t pc, uint64_t ns, int store)
{
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
		st.first_old_ns = ns;
	if (st.nhits < MAX_HITS)
		st.hits[st.nhits++] = (struct hit){ pfn, vaddr, pc, ns, store };
}

static size_t unknown_slot(const struct unknown *u, uint64_t pfn)
{
	size_t i = (size_t)(pfn * 0x9E3779B97F4A7C15ull) & (u->cap - 1);

	while (u->pfn[i] != UINT64_MAX && u->pfn[i] != pfn)
		i = (i + 1) & (u->cap - 1);
	return i;
}

/* caller holds st.lock; -1 when the table cannot grow (the vCPU must not wait on malloc
 * failing: the hit is then only counted in unk_dropped) */
static int unknown_add(uint64_t pfn)
{
	struct unknown *u = &st.unk;
	size_t i;

	if (2 * (u->n + 1) > u->cap) {
		struct unknown bigger = { .cap = u->cap ? 2 * u->cap : 1024 };

		bigger.pfn = malloc(bigger.cap * sizeof(uint64_t));
		bigger.hits = calloc(bigger.cap, sizeof(uint64_t));
		if (!bigger.pfn || !bigger.hits) {
			free(bigger.pfn);
			free(bigger.hits);
			return -1;
		}
		memset(bigger.pfn, 0xff, bigger.cap * sizeof(uint64_t));
		for (i = 0; i < u->cap; i++) {
			if (u->pfn[i] == UINT64_MAX)
				continue;
			size_t j = unknown_slot(&bigger, u->pfn[i]);

			bigger.pfn[j] = u->pfn[i];
			bigger.hits[j] = u->hits[i];
			bigger.n++;
		}
		free(u->pfn);
		free(u->hits);
		*u = bigger;
	}
	i = unknown_slot(u, pfn);
	if (u->pfn[i] == UINT64_MAX) {
		u->pfn[i] = pfn;
		u->n++;
	}
	u->hits[i]++;
	return 0;
}

/* caller holds st.lock: the hits on @pfn while it was unknown, forgotten */
static uint64_t unknown_take(uint64_t pfn)
{
	struct unknown *u = &st.unk;
	uint64_t h;
	size_t i;

	if (!u->n)
		return 0;
	i = unknown_slot(u, pfn);
	if (u->pfn[i] == UINT64_MAX)
		return 0;
	h = u->hits[i];
	u->hits[i] = 0;   /* keep the key (tombstone-free deletion is not worth it here) */
	return h;
}

static uint64_t unknown_total(void)
{
	uint64_t t = 0;

	for (size_t i = 0; i < st.unk.cap; i++)
		t += st.unk.pfn[i] != UINT64_MAX ? st.unk.hits[i] : 0;
	return t + st.unk_dropped;
}

static void vcpu_mem(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr,
		     void *udata)
{
	const struct range *r = atomic_load_explicit(&cur_range, memory_order_acquire);
	uint64_t pc = (uint64_t)(uintptr_t)udata, pfn, ns;
	struct qemu_plugin_hwaddr *hw;
	struct entry *e;
	int store;

	(void)vcpu;
	if (vaddr < r->lo || vaddr >= r->hi)
		return;
	hw = qemu_plugin_get_hwaddr(info, vaddr);
	store = qemu_plugin_mem_is_store(info);
	ns = now_ns();
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
	if (st.nsamples < st.want_samples)
		st.samples[st.nsamples++] = (struct hit){ pfn, vaddr, pc, ns, store };
	if ((e = find(&st.set[NEW], pfn))) {
		e->hits++;
	} else if ((e = find(&st.set[OLD], pfn))) {
		if (ns < e->since) {
			e->early++;             /* it was still current then */
		} else if (ns < st.moved_at) {
			e->prior++;             /* before this move: judged at `retire` */
		} else {
			e->hits++;
			count_old_hit(pfn, vaddr, pc, ns, store);
		}
	} else {
		if (unknown_add(pfn))
			st.unk_dropped++;
		if (st.nothers < MAX_HITS)
			st.others[st.nothers++] = (struct hit){ pfn, vaddr, pc, ns, store };
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

static int cmp_entry(const void *a, const void *b)
{
	uint64_t x = ((const struct entry *)a)->pfn, y = ((const struct entry *)b)->pfn;

	return x < y ? -1 : x > y;
}

/* parse "PFN PFN ..." (hex) into a sorted set without duplicates; -1 on a bad token/ENOMEM */
static int parse_set(char *s, struct pfnset *out)
{
	size_t cap = 64, n = 0, i, j;
	struct entry *v = malloc(cap * sizeof(*v));
	char *tok, *save = NULL;

	if (!v)
		return -1;
	for (tok = strtok_r(s, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
		uint64_t x;

		if (parse_u64(tok, 16, &x))
			goto bad;
		if (n == cap) {
			struct entry *nv = realloc(v, 2 * cap * sizeof(*v));

			if (!nv)
				goto bad;
			v = nv;
			cap *= 2;
		}
		v[n++] = (struct entry){ .pfn = x };
	}
	qsort(v, n, sizeof(*v), cmp_entry);
	for (i = j = 0; i < n; i++)
		if (!j || v[j - 1].pfn != v[i].pfn)
			v[j++] = v[i];
	out->e = v;
	out->n = j;
	return 0;
bad:
	free(v);
	return -1;
}

/* caller holds st.lock: NEW pfns missing from @now join OLD as retired at @t; NEW = @now */
static int retire(struct pfnset *now, uint64_t t)
{
	struct pfnset *o = &st.set[OLD], *nw = &st.set[NEW];
	size_t i, k = 0, gone = 0;
	struct entry *merged, *e;

	for (i = 0; i < nw->n; i++)
		gone += !find(now, nw->e[i].pfn);
	merged = malloc((o->n + gone ? o->n + gone : 1) * sizeof(*merged));
	if (!merged)
		return -1;
	for (i = 0; i < o->n; i++)          /* a pfn that is current again leaves OLD */
		if (!find(now, o->e[i].pfn))
			merged[k++] = o->e[i];
	for (i = 0; i < nw->n; i++)
		if (!find(now, nw->e[i].pfn))
			merged[k++] = (struct entry){ .pfn = nw->e[i].pfn, .since = t,
						      .early = nw->e[i].hits };
	qsort(merged, k, sizeof(*merged), cmp_entry);
	/*
	 * The new set's counts: a page that stays keeps its count; a page the guest read
	 * after the exporter's swap but before this command (unknown then, or retired by an
	 * earlier move and now reused) is credited here, to the page it turned out to be.
	 */
	for (i = 0; i < now->n; i++) {
		struct entry *ne = &now->e[i];

		if ((e = find(nw, ne->pfn)))
			ne->hits = e->hits;
		else if ((e = find(o, ne->pfn)))
			ne->hits = e->prior + e->early;
		ne->hits += unknown_take(ne->pfn);
	}
	free(o->e);
	free(nw->e);
	o->e = merged;
	o->n = k;
	*nw = *now;
	st.moved_at = t;
	return 0;
}

static void reset_epoch(uint64_t n)
{
	for (int k = 0; k < 2; k++)
		for (size_t i = 0; i < st.set[k].n; i++)
			st.set[k].e[i].hits = st.set[k].e[i].early = st.set[k].e[i].prior = 0;
	free(st.unk.pfn);
	free(st.unk.hits);
	st.unk = (struct unknown){ 0 };
	st.unk_dropped = 0;
	st.epoch = n;
	st.epoch_start_ns = now_ns();
	st.moved_at = UINT64_MAX;
	st.in_range = st.io = st.nohw = 0;
	st.first_old_ns = 0;
	st.nhits = st.nsamples = st.npcs = st.nothers = 0;
	st.pcs_dropped = 0;
}

/* a growing string: the dump of a 64 MiB buffer's epoch is hundreds of KiB */
struct sb {
	char *b;
	size_t len, cap;
	int oom;
};

static void outf(struct sb *s, const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		if (s->oom)
			return;
		va_start(ap, fmt);
		n = vsnprintf(s->b + s->len, s->cap - s->len, fmt, ap);
		va_end(ap);
		if (n < 0) {
			s->oom = 1;
			return;
		}
		if ((size_t)n < s->cap - s->len) {
			s->len += (size_t)n;
			return;
		}
		char *nb = realloc(s->b, 2 * s->cap + (size_t)n);

		if (!nb) {
			s->oom = 1;
			return;
		}
		s->b = nb;
		s->cap = 2 * s->cap + (size_t)n;
	}
}

static void set_json(struct sb *s, const char *name, const struct pfnset *p, int old)
{
	uint64_t hits = 0, early = 0, prior = 0;
	size_t i, pages = 0;

	for (i = 0; i < p->n; i++) {
		hits += p->e[i].hits;
		early += p->e[i].early;
		prior += p->e[i].prior;
		pages += p->e[i].hits != 0;
	}
	outf(s, ",\"%s\":{\"pages\":%zu,\"hits\":%" PRIu64 ",\"pages_hit\":%zu", name, p->n,
	     hits, pages);
	if (old)
		outf(s, ",\"before_retire\":%" PRIu64 ",\"before_move\":%" PRIu64, early, prior);
	outf(s, "}");
}

/* caller holds st.lock; returns a malloc'd JSON line or NULL */
static char *dump_json(void)
{
	const struct range *r = atomic_load(&cur_range);
	struct sb s = { .b = malloc(4096), .cap = 4096 };
	size_t i;

	if (!s.b)
		return NULL;
	outf(&s, "{\"epoch\":%" PRIu64 ",\"epoch_start_ns\":%" PRIu64 ",\"va\":[%" PRIu64 ",%" PRIu64
	     "],\"in_range\":%" PRIu64 ",\"io\":%" PRIu64 ",\"no_hwaddr\":%" PRIu64 ",\"other\":%"
	     PRIu64, st.epoch, st.epoch_start_ns, r->lo, r->hi, st.in_range, st.io, st.nohw,
	     unknown_total());
	set_json(&s, "old", &st.set[OLD], 1);
	set_json(&s, "new", &st.set[NEW], 0);
	outf(&s, ",\"first_old_hit_ns\":");
	if (st.first_old_ns)
		outf(&s, "%" PRIu64, st.first_old_ns);
	else
		outf(&s, "null");
	outf(&s, ",\"old_hits_by_pc\":[");
	for (i = 0; i < st.npcs; i++)
		outf(&s, "%s{\"pc\":%" PRIu64 ",\"hits\":%" PRIu64 ",\"vaddr_min\":%" PRIu64
		     ",\"vaddr_max\":%" PRIu64 "}", i ? "," : "", st.pcs[i].pc, st.pcs[i].count,
		     st.pcs[i].vmin, st.pcs[i].vmax);
	outf(&s, "],\"old_hits_other_pcs\":%" PRIu64, st.pcs_dropped);
	for (int pass = 0; pass < 3; pass++) {
		static const char *const name[] = { "old_hits", "other_hits", "samples" };
		const struct hit *h = pass == 0 ? st.hits : pass == 1 ? st.others : st.samples;
		size_t n = pass == 0 ? st.nhits : pass == 1 ? st.nothers : st.nsamples;

		size_t shown = 0;

		outf(&s, ",\"%s\":[", name[pass]);
		for (i = 0; i < n; i++) {
			/* an unknown page that `retire` named (a new page read early) is no question */
			if (pass == 1 && (find(&st.set[NEW], h[i].pfn) || find(&st.set[OLD], h[i].pfn)))
				continue;
			outf(&s, "%s{\"pfn\":%" PRIu64 ",\"vaddr\":%" PRIu64 ",\"pc\":%" PRIu64
			     ",\"ns\":%" PRIu64 ",\"store\":%s}", shown++ ? "," : "", h[i].pfn,
			     h[i].vaddr, h[i].pc, h[i].ns, h[i].store ? "true" : "false");
		}
		outf(&s, "]");
	}
	outf(&s, "}\n");
	if (s.oom) {
		free(s.b);
		return NULL;
	}
	return s.b;
}

static char *reply(const char *text)
{
	return strdup(text);
}

static char *handle(char *line)
{
	char *out = NULL;

	if (!strncmp(line, "range ", 6)) {
		char *save = NULL, *a = strtok_r(line + 6, " ", &save), *b = strtok_r(NULL, " ", &save);
		struct range *nr;
		uint64_t lo, hi;

		if (!a || !b || strtok_r(NULL, " ", &save) || parse_u64(a, 16, &lo) ||
		    parse_u64(b, 16, &hi) || lo >= hi)
			return reply("error range wants LO HI in hex, LO < HI\n");
		if (!(nr = malloc(sizeof(*nr))))
			return reply("error out of memory\n");
		*nr = (struct range){ lo, hi };
		atomic_store_explicit(&cur_range, nr, memory_order_release);
		return reply("ok\n");
	}
	if (!strncmp(line, "set old", 7) || !strncmp(line, "set new", 7)) {
		struct pfnset fresh = { 0 };
		int k = line[4] == 'n' ? NEW : OLD;

		if (line[7] && line[7] != ' ')
			return reply("error set wants old|new\n");
		if (parse_set(line + 7, &fresh))
			return reply("error set: bad hex pfn or out of memory\n");
		pthread_mutex_lock(&st.lock);
		free(st.set[k].e);
		st.set[k] = fresh;
		pthread_mutex_unlock(&st.lock);
		return reply("ok\n");
	}
	if (!strncmp(line, "retire ", 7)) {
		char *sp = strchr(line + 7, ' ');
		struct pfnset now = { 0 };
		uint64_t t;
		int rc;

		if (sp)
			*sp = 0;
		if (parse_u64(line + 7, 10, &t) || parse_set(sp ? sp + 1 : line + strlen(line), &now))
			return reply("error retire wants T (decimal ns) and hex pfns\n");
		pthread_mutex_lock(&st.lock);
		rc = retire(&now, t);
		pthread_mutex_unlock(&st.lock);
		if (rc) {
			free(now.e);
			return reply("error out of memory\n");
		}
		return reply("ok\n");
	}
	if (!strncmp(line, "epoch ", 6)) {
		uint64_t n;

		if (parse_u64(line + 6, 10, &n))
			return reply("error epoch wants a decimal number\n");
		pthread_mutex_lock(&st.lock);
		reset_epoch(n);
		pthread_mutex_unlock(&st.lock);
		return reply("ok\n");
	}
	if (!strncmp(line, "sample ", 7)) {
		uint64_t k;

		if (parse_u64(line + 7, 10, &k))
			return reply("error sample wants a decimal count\n");
		pthread_mutex_lock(&st.lock);
		st.want_samples = k > MAX_SAMPLES ? MAX_SAMPLES : k;
		pthread_mutex_unlock(&st.lock);
		return reply("ok\n");
	}
	if (!strcmp(line, "dump")) {
		pthread_mutex_lock(&st.lock);
		out = dump_json();
		pthread_mutex_unlock(&st.lock);
		return out ? out : reply("error out of memory\n");
	}
	if (!strcmp(line, "hello")) {
		if (asprintf(&out, "{\"abi\":%d,\"plugin_api\":%d}\n", HWTRACE_ABI,
			     QEMU_PLUGIN_VERSION) < 0)
			return NULL;
		return out;
	}
	return reply("error unknown command\n");
}

static int send_all(int fd, const char *s, size_t n)
{
	while (n) {
		ssize_t w = send(fd, s, n, MSG_NOSIGNAL);  /* a gone client is no SIGPIPE */

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
	size_t cap = 65536, len = 0, scanned = 0;
	char *buf = malloc(cap);

	while (buf) {
		/* only the bytes not yet searched: a multi-MiB pfn line is read in one pass */
		char *nl = memchr(buf + scanned, '\n', len - scanned);

		if (nl) {
			char *out;

			*nl = 0;
			out = handle(buf);
			if (!out || send_all(fd, out, strlen(out))) {
				free(out);
				break;
			}
			free(out);
			len -= (size_t)(nl + 1 - buf);
			memmove(buf, nl + 1, len);
			scanned = 0;
			continue;
		}
		scanned = len;
		if (len == cap) {
			char *nb = cap >= MAX_LINE ? NULL : realloc(buf, cap * 2);

			if (!nb) {
				send_all(fd, "error line too long\n", 20);
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
	(void)arg;
	for (;;) {
		int fd = accept(listen_fd, NULL, NULL);

		if (fd < 0) {
			if (errno == EBADF || errno == EINVAL)
				return NULL;           /* the socket is gone: QEMU is exiting */
			usleep(100000);            /* EMFILE and the like: try again, never give up */
			continue;
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
	sigset_t all, old;
	pthread_t t;
	int i, rc;

	if (!info->system_emulation) {
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
	unlink(sock_path);  /* a leftover of a killed QEMU in vmlab's own private directory */
	listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sa, sizeof(sa)) ||
	    /* nobody can connect before listen(), so the mode is set before anyone could */
	    chmod(sock_path, 0600) || listen(listen_fd, 1)) {
		fprintf(stderr, "vmlab-hwtrace: control socket %s: %s\n", sock_path, strerror(errno));
		return -1;
	}
	reset_epoch(0);
	/* the thread starts with every signal blocked: QEMU's signals are QEMU's business */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&t, NULL, control_thread, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc) {
		fprintf(stderr, "vmlab-hwtrace: cannot start the control thread\n");
		return -1;
	}
	pthread_detach(t);
	qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
	qemu_plugin_register_atexit_cb(id, at_exit, NULL);
	return 0;
}

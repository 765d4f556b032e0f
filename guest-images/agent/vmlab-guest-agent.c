// SPDX-License-Identifier: GPL-2.0
/*
 * vmlab-guest-agent: runs inside the KVM guest, maps BAR2 of the ivshmem
 * device (or another device's BAR with --pci-id and --bar: the shared memory
 * region of a vhost-user device; or a regular file with --path) and reads / writes / watches the
 * vmlab page stamps (vmlab_stamp.h).  Every command prints exactly one JSON
 * object on stdout (watch: one per line).
 *
 * Exit status: 0 ok, 1 error (one line on stderr), 2 usage error,
 * 3 SIGBUS/SIGSEGV while touching the mapping ({"error": "SIGBUS", ...}).
 *
 * Build: gcc -static -O2 -Wall -Wextra -Werror \
 *          -I host-tools/vmlab-exporter/include/uapi \
 *          -o vmlab-guest-agent guest-images/agent/[all .c files]
 * ("gpu ..." commands live in gpu.c; see there.)
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/random.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent-common.h"
#include "gpu.h"
#include "vmlab_stamp.h"

#define AGENT_VERSION 1
#define PAGE VMLAB_STAMP_PAGE_SIZE
#define PCI_DIR "/sys/bus/pci/devices"
#define DEBUGFS AGENT_DEBUGFS
#define PAT_LIST AGENT_PAT_LIST
#define IVSHMEM_VENDOR 0x1af4
#define IVSHMEM_DEVICE 0x1110
/* where every buffer mapping lives; vmlab/hwtrace.py knows it too */
#define VMLAB_GUEST_MAP_VA 0x5a5a00000000UL

/* ------------------------------------------------------------------ */
/* errors and JSON helpers                                             */

static const char *g_cmd = "";

static void __attribute__((noreturn, format(printf, 1, 2))) die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	agent_vfail(1, "", "", fmt, ap);
}

static void __attribute__((noreturn, format(printf, 1, 2))) usage(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	agent_vfail(2, "usage: ", " (commands: find map read write watch virtio-start "
		    "vectors pat version gpu reseed kernel-state; options: --path FILE --device BDF --pci-id VVVV:DDDD --bar N --caching wb|wc|uc "
		    "--first I --count N --tag T --store plain|avx --duration S --interval-us U --pages I,J; "
		    "pat: --phys ADDR --pat-file FILE)", fmt, ap);
}

#define json_str agent_json_str

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* SIGBUS / SIGSEGV while touching the mapping                         */

static sigjmp_buf g_fault_jb;
static volatile sig_atomic_t g_fault_armed;
static volatile sig_atomic_t g_fault_sig;
static volatile long g_cur_page = -1;
static uintptr_t g_map_lo, g_map_hi;	/* the buffer's mapping: [lo, hi) */

/*
 * Only a fault the kernel raised (si_code > 0) is the guest's verdict: a SIGBUS
 * or SIGSEGV on the buffer's mapping, or the SIGILL of a #UD (its address is
 * the instruction's).  A signal sent with kill(), or a SIGSEGV on the agent's
 * own memory, is no fault of the mapping: it kills the agent as it would
 * without this handler, and the controller sees an agent that died.
 */
static void fault_handler(int sig, siginfo_t *si, void *uc)
{
	uintptr_t a = (uintptr_t)si->si_addr;

	(void)uc;
	if (g_fault_armed && si->si_code > 0 &&
	    (sig == SIGILL || (a >= g_map_lo && a < g_map_hi))) {
		g_fault_sig = sig;
		siglongjmp(g_fault_jb, 1);
	}
	signal(sig, SIG_DFL);
	raise(sig);
}

static void install_fault_handler(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = fault_handler;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, NULL);
	sigaction(SIGSEGV, &sa, NULL);
	/* a store the hypervisor could not emulate comes back as #UD */
	sigaction(SIGILL, &sa, NULL);
}

/* Called after siglongjmp: report the fault as the command's JSON result. */
static void __attribute__((noreturn)) report_fault(int with_time)
{
	g_fault_armed = 0;
	printf("{\"error\": \"%s\", \"page\": %ld",
	       g_fault_sig == SIGSEGV ? "SIGSEGV" : g_fault_sig == SIGILL ? "SIGILL" : "SIGBUS",
	       (long)g_cur_page);
	if (with_time)
		printf(", \"t_ns\": %" PRIu64, now_ns());
	printf("}\n");
	fflush(stdout);
	exit(3);
}

/*
 * Run fn(arg) with the fault handler armed.  The work happens in fn, so no
 * local of this frame changes after sigsetjmp (nothing for longjmp to clobber);
 * a fault ends the program through report_fault().
 */
static void run_guarded(void (*fn)(void *), void *arg, int with_time)
{
	if (sigsetjmp(g_fault_jb, 1))
		report_fault(with_time);
	g_fault_armed = 1;
	fn(arg);
	g_fault_armed = 0;
}

/* ------------------------------------------------------------------ */
/* options                                                             */

enum caching { CACHE_UC, CACHE_WC, CACHE_WB };
static const char *const caching_names[] = { "uc", "wc", "wb" };

struct opts {
	const char *path;
	const char *device;
	enum caching caching;
	int have_first, have_count, have_tag, have_duration, have_interval;
	uint64_t first, count, tag, interval_us;
	double duration;
	const char *pages;
	const char *vector_file;
	int store_avx;          /* write --store avx: one 32-byte VEX store per page */
	int have_phys;          /* pat --phys ADDR: also show the matching line */
	uint64_t phys;
	const char *pat_file;   /* pat --pat-file FILE: parse FILE (tests) */
	unsigned vendor, device_id, bar; /* which PCI device and BAR holds the buffer */
};

static uint64_t parse_u64(const char *opt, const char *s)
{
	uint64_t v = 0;

	switch (agent_parse_u64(s, &v)) {
	case -1:
		usage("%s needs a non-negative integer", opt);
	case -2:
		usage("bad value for %s: '%s'", opt, s);
	}
	return v;
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
	int i;

	memset(o, 0, sizeof(*o));
	o->caching = CACHE_UC;
	o->interval_us = 1000;
	o->vendor = IVSHMEM_VENDOR;
	o->device_id = IVSHMEM_DEVICE;
	o->bar = 2;
	for (i = 2; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (a[0] != '-' || a[1] != '-') {
			if (!strcmp(g_cmd, "vectors") && !o->vector_file) {
				o->vector_file = a;
				continue;
			}
			usage("unexpected argument '%s'", a);
		}
		{
			static const char *const known[] = {
				"--path", "--device", "--caching", "--first", "--count", "--tag", "--store",
				"--interval-us", "--duration", "--pages", "--phys", "--pat-file",
				"--pci-id", "--bar",
			};
			size_t k;

			for (k = 0; k < sizeof(known) / sizeof(known[0]); k++)
				if (!strcmp(a, known[k]))
					break;
			if (k == sizeof(known) / sizeof(known[0]))
				usage("unknown option '%s'", a);
		}
		if (!v)
			usage("option %s needs a value", a);
		if (!strcmp(a, "--path")) {
			o->path = v;
		} else if (!strcmp(a, "--device")) {
			o->device = v;
		} else if (!strcmp(a, "--caching")) {
			if (!strcmp(v, "uc"))
				o->caching = CACHE_UC;
			else if (!strcmp(v, "wc"))
				o->caching = CACHE_WC;
			else if (!strcmp(v, "wb"))
				o->caching = CACHE_WB;
			else
				usage("--caching must be wb, wc or uc, not '%s'", v);
		} else if (!strcmp(a, "--first")) {
			o->first = parse_u64(a, v);
			o->have_first = 1;
		} else if (!strcmp(a, "--count")) {
			o->count = parse_u64(a, v);
			o->have_count = 1;
		} else if (!strcmp(a, "--tag")) {
			o->tag = parse_u64(a, v);
			o->have_tag = 1;
		} else if (!strcmp(a, "--store")) {
			if (!strcmp(v, "avx"))
				o->store_avx = 1;
			else if (strcmp(v, "plain"))
				usage("--store is plain or avx, not '%s'", v);
		} else if (!strcmp(a, "--interval-us")) {
			o->interval_us = parse_u64(a, v);
			o->have_interval = 1;
		} else if (!strcmp(a, "--duration")) {
			char *end;

			errno = 0;
			o->duration = strtod(v, &end);
			if (errno || *end || !*v || !(o->duration >= 0) || o->duration > 1e7)
				usage("bad value for --duration: '%s'", v);
			o->have_duration = 1;
		} else if (!strcmp(a, "--pages")) {
			o->pages = v;
		} else if (!strcmp(a, "--phys")) {
			o->phys = parse_u64(a, v);
			o->have_phys = 1;
		} else if (!strcmp(a, "--pat-file")) {
			o->pat_file = v;
		} else if (!strcmp(a, "--pci-id")) {
			char *end;
			unsigned long ven, dev;

			errno = 0;
			ven = strtoul(v, &end, 16);
			if (errno || end == v || *end != ':' || ven > 0xffff)
				usage("bad --pci-id '%s' (want VVVV:DDDD in hex)", v);
			v = end + 1;
			dev = strtoul(v, &end, 16);
			if (errno || end == v || *end || dev > 0xffff)
				usage("bad --pci-id (want VVVV:DDDD in hex)");
			o->vendor = (unsigned)ven;
			o->device_id = (unsigned)dev;
		} else if (!strcmp(a, "--bar")) {
			uint64_t b = parse_u64(a, v);

			if (b > 5)
				usage("--bar is 0..5, not %" PRIu64, b);
			o->bar = (unsigned)b;
		} else {
			usage("unknown option '%s'", a);
		}
		i++;
	}
}

/* ------------------------------------------------------------------ */
/* sysfs / PCI                                                         */

static int read_file_str(const char *path, char *buf, size_t n)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t r;

	if (fd < 0)
		return -1;
	r = read(fd, buf, n - 1);
	close(fd);
	if (r < 0)
		return -1;
	buf[r] = 0;
	return 0;
}

static int read_hex_file(const char *path, unsigned long *v)
{
	char buf[64];

	if (read_file_str(path, buf, sizeof(buf)))
		return -1;
	*v = strtoul(buf, NULL, 0);
	return 0;
}

struct dev {
	char bdf[256];
	unsigned bar;
	uint64_t phys, size;
	int has_wc;
};

static int is_device(const char *bdf, unsigned vendor, unsigned device_id)
{
	char p[512];
	unsigned long ven, dev;

	snprintf(p, sizeof(p), PCI_DIR "/%s/vendor", bdf);
	if (read_hex_file(p, &ven))
		return 0;
	snprintf(p, sizeof(p), PCI_DIR "/%s/device", bdf);
	if (read_hex_file(p, &dev))
		return 0;
	return ven == vendor && dev == device_id;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void find_device(const struct opts *o, struct dev *d)
{
	char p[512], line[512];
	FILE *f;
	int i;
	unsigned long long start = 0, end = 0, flags = 0;

	memset(d, 0, sizeof(*d));
	if (o->device) {
		struct stat st;

		if (strchr(o->device, '/'))
			die("bad --device '%s' (want a PCI address like 0000:00:04.0)", o->device);
		snprintf(d->bdf, sizeof(d->bdf), "%s", o->device);
		snprintf(p, sizeof(p), PCI_DIR "/%s", d->bdf);
		if (stat(p, &st))
			die("PCI device %s: %s", p, strerror(errno));
	} else {
		DIR *dir = opendir(PCI_DIR);
		struct dirent *de;
		char *names[1024];
		int n = 0, found = 0;

		if (!dir)
			die("cannot open %s: %s", PCI_DIR, strerror(errno));
		while ((de = readdir(dir)) && n < 1024) {
			if (de->d_name[0] == '.')
				continue;
			names[n++] = strdup(de->d_name);
		}
		closedir(dir);
		qsort(names, n, sizeof(names[0]), cmp_str);
		for (i = 0; i < n; i++) {
			if (!found && is_device(names[i], o->vendor, o->device_id)) {
				snprintf(d->bdf, sizeof(d->bdf), "%s", names[i]);
				found = 1;
			}
			free(names[i]);
		}
		if (!found)
			die("no PCI device %04x:%04x in %s", o->vendor, o->device_id, PCI_DIR);
	}
	snprintf(p, sizeof(p), PCI_DIR "/%s/resource", d->bdf);
	f = fopen(p, "re");
	if (!f)
		die("cannot open %s: %s", p, strerror(errno));
	for (i = 0; i <= (int)o->bar; i++) {
		if (!fgets(line, sizeof(line), f)) {
			fclose(f);
			die("%s has no line for BAR%u", p, o->bar);
		}
	}
	fclose(f);
	if (sscanf(line, "%llx %llx %llx", &start, &end, &flags) != 3)
		die("cannot parse BAR%u line of %s: '%s'", o->bar, p, line);
	if (!start || end < start)
		die("BAR%u of %s is not assigned (resource line '%.60s')", o->bar, d->bdf, line);
	d->phys = start;
	d->size = end - start + 1;
	d->bar = o->bar;
	snprintf(p, sizeof(p), PCI_DIR "/%s/resource%u_wc", d->bdf, o->bar);
	d->has_wc = access(p, F_OK) == 0;
}

static void enable_device(const struct dev *d)
{
	char p[512], buf[16];
	int fd;

	snprintf(p, sizeof(p), PCI_DIR "/%s/enable", d->bdf);
	if (read_file_str(p, buf, sizeof(buf)))
		die("cannot read %s: %s", p, strerror(errno));
	if (buf[0] != '0')
		return;
	fd = open(p, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die("cannot open %s to enable the device: %s", p, strerror(errno));
	if (write(fd, "1", 1) != 1) {
		int e = errno;

		close(fd);
		die("cannot write 1 to %s: %s", p, strerror(e));
	}
	close(fd);
}

/* ------------------------------------------------------------------ */
/* mapping                                                             */

struct mapping {
	volatile uint8_t *base;
	uint64_t size, pages;
	int is_file;
	struct dev dev;
	const char *what; /* file that was mapped */
	char what_buf[512];
};

static void map_buffer(const struct opts *o, struct mapping *m)
{
	int fd;
	void *p;
	off_t off = 0;

	memset(m, 0, sizeof(*m));
	if (o->path) {
		struct stat st;

		m->is_file = 1;
		m->what = o->path;
		fd = open(o->path, O_RDWR | O_CLOEXEC);
		if (fd < 0)
			die("cannot open %s: %s", o->path, strerror(errno));
		if (fstat(fd, &st))
			die("fstat %s: %s", o->path, strerror(errno));
		if (st.st_size <= 0 || st.st_size % PAGE)
			die("%s: size %lld is not a positive multiple of %u", o->path,
			    (long long)st.st_size, PAGE);
		m->size = (uint64_t)st.st_size;
	} else {
		find_device(o, &m->dev);
		m->size = m->dev.size;
		if (m->size < PAGE || m->size % PAGE)
			die("BAR%u of %s has size %" PRIu64 ", not a multiple of %u", m->dev.bar,
			    m->dev.bdf, m->size, PAGE);
		enable_device(&m->dev);
		switch (o->caching) {
		case CACHE_UC:
			snprintf(m->what_buf, sizeof(m->what_buf), PCI_DIR "/%s/resource%u",
				 m->dev.bdf, m->dev.bar);
			break;
		case CACHE_WC:
			snprintf(m->what_buf, sizeof(m->what_buf), PCI_DIR "/%s/resource%u_wc",
				 m->dev.bdf, m->dev.bar);
			if (access(m->what_buf, F_OK))
				die("%s does not exist (BAR not prefetchable?): wc mapping "
				    "impossible", m->what_buf);
			break;
		case CACHE_WB:
			snprintf(m->what_buf, sizeof(m->what_buf), "/dev/mem");
			off = (off_t)m->dev.phys;
			break;
		}
		m->what = m->what_buf;
		/* /dev/mem deliberately without O_SYNC: x86 then gives WB for non-RAM */
		fd = open(m->what, O_RDWR | O_CLOEXEC);
		if (fd < 0)
			die("cannot open %s: %s", m->what, strerror(errno));
	}
	m->pages = m->size / PAGE;
	/*
	 * Always at the same address, which nothing else in the guest or the lab uses: the
	 * hardware oracle in the outer QEMU tells this mapping's accesses apart by it.
	 */
	p = mmap((void *)VMLAB_GUEST_MAP_VA, m->size, PROT_READ | PROT_WRITE,
		 MAP_SHARED | MAP_FIXED_NOREPLACE, fd, off);
	if (p != MAP_FAILED && p != (void *)VMLAB_GUEST_MAP_VA) {
		munmap(p, m->size);  /* a kernel before 4.17 took the address as a hint */
		die("mmap %s did not land at 0x%lx", m->what, VMLAB_GUEST_MAP_VA);
	}
	if (p == MAP_FAILED) {
		int e = errno;

		if (o->caching == CACHE_WB && !m->is_file)
			die("mmap /dev/mem at 0x%" PRIx64 " size %" PRIu64 " failed: errno %d (%s)",
			    m->dev.phys, m->size, e, strerror(e));
		die("mmap %s size %" PRIu64 " failed: errno %d (%s)", m->what, m->size, e,
		    strerror(e));
	}
	close(fd);
	m->base = (volatile uint8_t *)p;
	g_map_lo = (uintptr_t)p;
	g_map_hi = (uintptr_t)p + m->size;
}

static void unmap_buffer(struct mapping *m)
{
	if (m->base)
		munmap((void *)m->base, m->size);
	m->base = NULL;
}

/* 8-byte volatile loads only: no SSE/AVX string ops on UC/WC memory. */
static void copy_words(void *dst, const volatile uint8_t *src, size_t bytes)
{
	const volatile uint64_t *s = (const volatile uint64_t *)src;
	uint8_t *d = (uint8_t *)dst;
	size_t i;

	/* memcpy of each word: the store may alias any type (no TBAA surprises) */
	for (i = 0; i < bytes / 8; i++) {
		uint64_t v = s[i];

		memcpy(d + 8 * i, &v, 8);
	}
}

/* ------------------------------------------------------------------ */
/* PAT memtype list                                                    */

static void ensure_debugfs(void)
{
	if (agent_mount_debugfs())
		die("mount debugfs at %s: %s", DEBUGFS, strerror(errno));
}

struct memtype {
	char type[64];
	char line[256];
	int found;
};

#define parse_pat_line agent_parse_pat_line

static void chomp(char *s)
{
	size_t n = strlen(s);

	while (n && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' '))
		s[--n] = 0;
}

static void lookup_memtype(uint64_t phys, struct memtype *mt, const char *list)
{
	FILE *f;
	char line[256];

	memset(mt, 0, sizeof(*mt));
	snprintf(mt->type, sizeof(mt->type), "unknown");
	if (!list) {
		ensure_debugfs();
		list = PAT_LIST;
	}
	f = fopen(list, "re");
	if (!f)
		die("cannot open %s: %s", list, strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		unsigned long long s, e;
		const char *type;

		chomp(line);
		if (parse_pat_line(line, &s, &e, &type))
			continue;
		/* the kernel prints [start-end) with end exclusive */
		if (phys >= s && (phys < e || (e == s && phys == s))) {
			snprintf(mt->type, sizeof(mt->type), "%s", type);
			snprintf(mt->line, sizeof(mt->line), "%s", line);
			mt->found = 1;
			break;
		}
	}
	fclose(f);
}

/* memtype for the JSON: "n/a" for --path, else from the PAT list (while mapped). */
static void mapping_memtype(const struct mapping *m, struct memtype *mt)
{
	if (m->is_file) {
		memset(mt, 0, sizeof(*mt));
		snprintf(mt->type, sizeof(mt->type), "n/a");
		return;
	}
	lookup_memtype(m->dev.phys, mt, NULL);
}

/* ------------------------------------------------------------------ */
/* commands                                                            */

#define WATCH_HOLE (-100)

static const char *status_name(int st)
{
	switch (st) {
	case VMLAB_STAMP_OK: return "ok";
	case VMLAB_STAMP_BAD_MAGIC: return "bad_magic";
	case VMLAB_STAMP_BAD_CSUM: return "bad_csum";
	case VMLAB_STAMP_BAD_PATTERN: return "bad_pattern";
	case WATCH_HOLE: return "hole";
	}
	return "unknown";
}

/*
 * A header of all zeros or all ones is no stamp at all: nothing mapped there (a VMM's
 * unmap window: an unbacked part of a BAR reads as one or the other), which the watcher
 * reports as its own class, never as a stale page.
 */
static int is_hole(const uint64_t *hdr, size_t words)
{
	size_t i;
	int zeros = 1, ones = 1;

	for (i = 0; i < words; i++) {
		zeros &= hdr[i] == 0;
		ones &= hdr[i] == ~0ull;
	}
	return zeros || ones;
}

static void page_range(const struct opts *o, const struct mapping *m, uint64_t *first,
		       uint64_t *count)
{
	*first = o->have_first ? o->first : 0;
	if (*first >= m->pages)
		die("--first %" PRIu64 " is beyond the last page (%" PRIu64 " pages)", *first,
		    m->pages);
	*count = o->have_count ? o->count : m->pages - *first;
	if (*count > m->pages - *first)
		die("--first %" PRIu64 " --count %" PRIu64 " exceeds %" PRIu64 " pages", *first,
		    *count, m->pages);
}

/*
 * virtio-start: the VIRTIO handshake (features, FEATURES_OK, DRIVER_OK) for a device that
 * no guest driver claims (vmlab's vhost-user shared memory device), done from here through
 * the device's common configuration structure.  The VMM starts its vhost-user back-end
 * only at DRIVER_OK, and only a started back-end may map memory into the device's shared
 * memory region (QEMU 11.1 crashes on a mapping sent to a stopped one).  Offers
 * VIRTIO_F_VERSION_1 and nothing else.
 *
 * Linux's virtio-pci transport binds every virtio device, driver or not, and claims the
 * BAR of its common configuration, which (IO_STRICT_DEVMEM) makes that BAR unmappable
 * from user space: the device is unbound from it first.
 */
#define VIRTIO_PCI_CAP_VENDOR 0x09
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_S_ACKNOWLEDGE 1
#define VIRTIO_S_DRIVER 2
#define VIRTIO_S_DRIVER_OK 4
#define VIRTIO_S_FEATURES_OK 8
#define VIRTIO_S_FAILED 0x80

static int cmd_virtio_start(const struct opts *o)
{
	struct dev d;
	uint8_t cfg[256];
	char p[512];
	int fd, hops = 0;
	ssize_t n;
	unsigned pos, cap_bar = 0, found = 0;
	uint32_t cap_off = 0, feat_hi;
	volatile uint8_t *base;
	volatile uint8_t *cc;
	size_t maplen;
	uint8_t before, st;
	int unbound = 0;

	if (o->path)
		usage("virtio-start starts a PCI device; --path makes no sense here");
	find_device(o, &d);
	snprintf(p, sizeof(p), PCI_DIR "/%s/config", d.bdf);
	fd = open(p, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("cannot open %s: %s", p, strerror(errno));
	n = pread(fd, cfg, sizeof(cfg), 0);
	close(fd);
	if (n < (ssize_t)sizeof(cfg))
		die("%s: read %zd of 256 bytes (root needed)", p, n);
	if (!(cfg[6] & 0x10))
		die("%s has no capability list", d.bdf);
	for (pos = cfg[0x34] & ~3u; pos && hops < 48; pos = cfg[pos + 1] & ~3u, hops++) {
		if (pos > sizeof(cfg) - 16)
			die("%s: capability at 0x%x runs past the config space", d.bdf, pos);
		if (cfg[pos] == VIRTIO_PCI_CAP_VENDOR && cfg[pos + 3] == VIRTIO_PCI_CAP_COMMON_CFG) {
			cap_bar = cfg[pos + 4];
			memcpy(&cap_off, cfg + pos + 8, 4);
			found = 1;
			break;
		}
	}
	if (!found || cap_bar > 5)
		die("%s has no VIRTIO common configuration capability", d.bdf);
	snprintf(p, sizeof(p), PCI_DIR "/%s/driver/unbind", d.bdf);
	if (access(p, F_OK) == 0) {
		fd = open(p, O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			die("cannot open %s: %s", p, strerror(errno));
		if (write(fd, d.bdf, strlen(d.bdf)) != (ssize_t)strlen(d.bdf)) {
			int e = errno;

			close(fd);
			die("cannot unbind %s from its driver: %s", d.bdf, strerror(e));
		}
		close(fd);
		unbound = 1;
	}
	enable_device(&d);
	{
		struct opts bo = *o;
		struct dev cd;

		bo.device = d.bdf;
		bo.bar = cap_bar;
		find_device(&bo, &cd);   /* the common config's BAR: assigned, and big enough */
		if ((uint64_t)cap_off + 64 > cd.size)
			die("%s: common configuration at 0x%x is outside BAR%u (%" PRIu64 " bytes)",
			    d.bdf, cap_off, cap_bar, cd.size);
	}
	snprintf(p, sizeof(p), PCI_DIR "/%s/resource%u", d.bdf, cap_bar);
	fd = open(p, O_RDWR | O_SYNC | O_CLOEXEC);
	if (fd < 0)
		die("cannot open %s: %s", p, strerror(errno));
	maplen = ((size_t)cap_off + 64 + PAGE - 1) & ~((size_t)PAGE - 1);
	base = mmap(NULL, maplen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (base == MAP_FAILED)
		die("mmap %s (%zu bytes): %s", p, maplen, strerror(errno));
	cc = base + cap_off;
	/* struct virtio_pci_common_cfg: 0 device_feature_select, 4 device_feature,
	 * 8 driver_feature_select, 12 driver_feature, 20 device_status */
	before = cc[20];
	if (!(before & VIRTIO_S_DRIVER_OK)) {
		int tries;

		/* from a clean state (VIRTIO 1.x 3.1.1): reset, and wait until it reads 0 */
		cc[20] = 0;
		for (tries = 0; cc[20] != 0; tries++) {
			if (tries > 1000)
				die("%s did not reset (status 0x%x)", d.bdf, cc[20]);
			usleep(1000);
		}
		cc[20] = VIRTIO_S_ACKNOWLEDGE;
		*(volatile uint32_t *)(cc + 0) = 1;
		feat_hi = *(volatile uint32_t *)(cc + 4);
		if (!(feat_hi & 1))
			die("%s does not offer VIRTIO_F_VERSION_1 (features 63..32: 0x%x)", d.bdf,
			    feat_hi);
		cc[20] = VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER;
		*(volatile uint32_t *)(cc + 8) = 0;
		*(volatile uint32_t *)(cc + 12) = 0;
		*(volatile uint32_t *)(cc + 8) = 1;
		*(volatile uint32_t *)(cc + 12) = 1;   /* VIRTIO_F_VERSION_1 */
		cc[20] = VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK;
		st = cc[20];
		if (!(st & VIRTIO_S_FEATURES_OK) || (st & VIRTIO_S_FAILED))
			die("%s refused the features (status 0x%x)", d.bdf, st);
		cc[20] = st | VIRTIO_S_DRIVER_OK;
	}
	st = cc[20];
	munmap((void *)base, maplen);
	if (!(st & VIRTIO_S_DRIVER_OK))
		die("%s did not take DRIVER_OK (status 0x%x)", d.bdf, st);
	printf("{\"bdf\": ");
	json_str(stdout, d.bdf);
	printf(", \"unbound_from_driver\": %s, \"status_before\": %u, \"status\": %u}\n",
	       unbound ? "true" : "false", before, st);
	return 0;
}

static int cmd_version(const struct opts *o)
{
	(void)o;
	printf("{\"agent\": \"vmlab-guest-agent\", \"version\": %d}\n", AGENT_VERSION);
	return 0;
}

/*
 * kernel-state: the taint mask, then the kernel log exactly as the guest's (busybox)
 * `dmesg` prints it, so a run's health check may take either at either end: a line's
 * "<level>" prefix dropped, a newline at the end. One agent request instead of an SSH
 * exec. --path FILE: format FILE's bytes instead of the log (tests).
 */
static int cmd_kernel_state(const struct opts *o)
{
	unsigned long long taint = 0;
	char *buf;
	int len, in, last = '\n';
	FILE *f = fopen("/proc/sys/kernel/tainted", "r");

	if (!f || fscanf(f, "%llu", &taint) != 1)
		die("/proc/sys/kernel/tainted: %s", f ? "not a number" : strerror(errno));
	fclose(f);
	if (o->path) {
		struct stat st;
		int fd = open(o->path, O_RDONLY | O_CLOEXEC);

		if (fd < 0 || fstat(fd, &st))
			die("cannot open %s: %s", o->path, strerror(errno));
		buf = malloc((size_t)st.st_size + 1);
		if (!buf)
			die("out of memory");
		len = (int)read(fd, buf, (size_t)st.st_size);
		close(fd);
		if (len < 0)
			die("%s: %s", o->path, strerror(errno));
	} else {
		/* busybox's own bounds on the buffer it reads */
		len = klogctl(10, NULL, 0);         /* SYSLOG_ACTION_SIZE_BUFFER */
		if (len < 16 * 1024)
			len = 16 * 1024;
		if (len > 16 * 1024 * 1024)
			len = 16 * 1024 * 1024;
		buf = malloc((size_t)len);
		if (!buf)
			die("out of memory");
		len = klogctl(3, buf, len);         /* SYSLOG_ACTION_READ_ALL */
		if (len < 0)
			die("klogctl: %s", strerror(errno));
	}
	printf("%llu\n", taint);
	for (in = 0; in < len; ) {
		if (last == '\n' && buf[in] == '<') {
			while (in < len && buf[in++] != '>')
				;
		} else {
			last = (unsigned char)buf[in++];
			putchar(last);
		}
	}
	if (last != '\n')
		putchar('\n');
	free(buf);
	return 0;
}

static int cmd_find(const struct opts *o)
{
	struct dev d;

	if (o->path)
		usage("find looks for the PCI device; --path makes no sense here");
	find_device(o, &d);
	printf("{\"bdf\": ");
	json_str(stdout, d.bdf);
	/* the keys keep their ivshmem names: "bar" says which BAR they describe */
	printf(", \"bar\": %u, \"bar2_phys\": \"0x%" PRIx64 "\", \"bar2_size\": %" PRIu64
	       ", \"resource2_wc\": %s}\n", d.bar, d.phys, d.size, d.has_wc ? "true" : "false");
	return 0;
}

static void print_phys(const struct mapping *m)
{
	if (m->is_file)
		printf("null");
	else
		printf("\"0x%" PRIx64 "\"", m->dev.phys);
}

static void touch_first(void *arg)
{
	const struct mapping *m = arg;
	uint64_t w;

	g_cur_page = 0;
	w = *(const volatile uint64_t *)m->base;
	(void)w;
}

static int cmd_map(const struct opts *o)
{
	struct mapping m;
	struct memtype mt;

	map_buffer(o, &m);
	install_fault_handler();
	run_guarded(touch_first, &m, 0);
	mapping_memtype(&m, &mt);
	printf("{\"caching\": \"%s\", \"memtype\": ", caching_names[o->caching]);
	json_str(stdout, mt.type);
	printf(", \"pat_line\": ");
	json_str(stdout, mt.found ? mt.line : NULL);
	printf(", \"bar2_phys\": ");
	print_phys(&m);
	printf(", \"size\": %" PRIu64, m.size);
	if (m.is_file) {
		printf(", \"path\": ");
		json_str(stdout, m.what);
	} else {
		printf(", \"bdf\": ");
		json_str(stdout, m.dev.bdf);
	}
	printf("}\n");
	unmap_buffer(&m);
	return 0;
}

struct record {
	uint64_t index, buffer_id, generation, page_index, tag;
	int status;
	unsigned state;
};

struct sum_entry {
	int status;
	uint64_t generation;
	unsigned state;
	uint64_t count;
};

struct read_ctx {
	const struct mapping *m;
	uint64_t first, count, read_ns;
	struct record *rec;
};

static void read_pages(void *arg)
{
	static uint64_t page[PAGE / 8];
	struct read_ctx *c = arg;
	const struct mapping *m = c->m;
	struct record *rec = c->rec;
	uint64_t first = c->first, i, read_ns = 0;

	for (i = 0; i < c->count; i++) {
		struct vmlab_stamp_hdr hh;
		uint64_t t0, t1;

		g_cur_page = (long)(first + i);
		t0 = now_ns();
		copy_words(page, m->base + (first + i) * PAGE, PAGE);
		t1 = now_ns();
		read_ns += t1 - t0;
		rec[i].index = first + i;
		rec[i].status = vmlab_stamp_check(page);
		memcpy(&hh, page, sizeof(hh));
		rec[i].buffer_id = hh.buffer_id;
		rec[i].generation = hh.generation;
		rec[i].page_index = hh.page_index;
		rec[i].state = hh.state;
		memcpy(&rec[i].tag, (const uint8_t *)page + VMLAB_STAMP_GUEST_OFF, 8);
	}
	c->read_ns = read_ns;
}

static int cmd_read(const struct opts *o)
{
	struct mapping m;
	struct memtype mt;
	struct record *rec;
	struct sum_entry *sum = NULL;
	size_t nsum = 0, capsum = 0, j;
	uint64_t first, count, i;
	struct read_ctx c;

	map_buffer(o, &m);
	page_range(o, &m, &first, &count);
	rec = calloc(count ? count : 1, sizeof(*rec));
	if (!rec)
		die("out of memory for %" PRIu64 " records", count);
	install_fault_handler();
	c.m = &m;
	c.first = first;
	c.count = count;
	c.rec = rec;
	c.read_ns = 0;
	run_guarded(read_pages, &c, 0);
	mapping_memtype(&m, &mt);

	for (i = 0; i < count; i++) {
		for (j = 0; j < nsum; j++)
			if (sum[j].status == rec[i].status &&
			    sum[j].generation == rec[i].generation && sum[j].state == rec[i].state)
				break;
		if (j == nsum) {
			if (nsum == capsum) {
				capsum = capsum ? 2 * capsum : 16;
				sum = realloc(sum, capsum * sizeof(*sum));
				if (!sum)
					die("out of memory");
			}
			sum[nsum].status = rec[i].status;
			sum[nsum].generation = rec[i].generation;
			sum[nsum].state = rec[i].state;
			sum[nsum].count = 0;
			nsum++;
		}
		sum[j].count++;
	}

	printf("{\"caching\": \"%s\", \"memtype\": ", caching_names[o->caching]);
	json_str(stdout, mt.type);
	printf(", \"bar2_phys\": ");
	print_phys(&m);
	/*
	 * Every page's record, run-length encoded: [index, count, status, buffer_id,
	 * generation, page_index, state, tag] stands for count pages from index on, whose
	 * page_index counts up from page_index and whose other fields are equal. Lossless
	 * (the controller expands it and judges each page), and a 64 MiB read of one
	 * generation is one run instead of 16384 records through two SSH hops.
	 */
	printf(", \"first\": %" PRIu64 ", \"pages\": %" PRIu64 ", \"runs\": [", first, count);
	for (i = 0; i < count; ) {
		uint64_t n = 1;

		while (i + n < count && rec[i + n].status == rec[i].status &&
		       rec[i + n].buffer_id == rec[i].buffer_id &&
		       rec[i + n].generation == rec[i].generation &&
		       rec[i + n].state == rec[i].state && rec[i + n].tag == rec[i].tag &&
		       rec[i + n].page_index == rec[i].page_index + n)
			n++;
		printf("%s[%" PRIu64 ", %" PRIu64 ", \"%s\", %" PRIu64 ", %" PRIu64 ", %" PRIu64
		       ", %u, %" PRIu64 "]", i ? ", " : "", rec[i].index, n,
		       status_name(rec[i].status), rec[i].buffer_id, rec[i].generation,
		       rec[i].page_index, rec[i].state, rec[i].tag);
		i += n;
	}
	printf("], \"summary\": {");
	for (j = 0; j < nsum; j++)
		printf("%s\"%s/%" PRIu64 "/%u\": %" PRIu64, j ? ", " : "",
		       status_name(sum[j].status), sum[j].generation, sum[j].state, sum[j].count);
	printf("}, \"read_ns\": %" PRIu64 "}\n", c.read_ns);
	free(rec);
	free(sum);
	unmap_buffer(&m);
	return 0;
}

/*
 * One VM exit that needs no emulation (CPUID), right before a store that may need
 * it (to a read-only PTE).  Under a TCG lab, QEMU's emulated SVM leaves the type bits
 * of the last injected event in EXITINTINFO at the next #VMEXIT, and a 7.x KVM then
 * refuses to emulate that exit ("during event delivery": internal error, suberror 3);
 * after this exit the next one carries none.  On hardware it changes nothing.
 */
static inline void settle_exit(void)
{
	unsigned int a = 0, b, c = 0, d;

	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
}

struct write_ctx {
	const struct mapping *m;
	uint64_t first, count, tag, bad;
	int avx;
};

/*
 * The tag as the first 8 bytes of one VEX-encoded 32-byte store (vmovdqu ymm):
 * an instruction a hypervisor must emulate differently from a plain mov when
 * the store faults into it.  The other 24 bytes are written back unchanged.
 */
static void store_tag_avx(volatile uint8_t *dst, uint64_t tag)
{
	uint64_t v[4];

	/* 8-byte volatile loads, as every read of the mapping: a memcpy may be one
	 * 32-byte load, and then the load, not the store, is what faults */
	copy_words(v, dst, sizeof(v));
	v[0] = tag;
	__asm__ volatile("vmovdqu (%1), %%ymm0\n\tvmovdqu %%ymm0, (%0)\n\tvzeroupper"
			 : : "r"(dst), "r"(v) : "memory", "xmm0");
}

static void write_pages(void *arg)
{
	struct write_ctx *c = arg;
	volatile uint8_t *base = c->m->base;
	uint64_t i, bad = 0;

	for (i = c->first; i < c->first + c->count; i++) {
		g_cur_page = (long)i;
		settle_exit();
		if (c->avx)
			store_tag_avx(base + i * PAGE + VMLAB_STAMP_GUEST_OFF, c->tag);
		else
			*(volatile uint64_t *)(base + i * PAGE + VMLAB_STAMP_GUEST_OFF) = c->tag;
	}
	__sync_synchronize();
	for (i = c->first; i < c->first + c->count; i++) {
		g_cur_page = (long)i;
		if (*(const volatile uint64_t *)(base + i * PAGE + VMLAB_STAMP_GUEST_OFF) != c->tag)
			bad++;
	}
	c->bad = bad;
}

static int cmd_write(const struct opts *o)
{
	struct mapping m;
	uint64_t first, count, bad;
	struct write_ctx c;

	if (!o->have_tag)
		usage("write needs --tag T");
	if (o->store_avx) {
		__builtin_cpu_init();
		if (!__builtin_cpu_supports("avx"))
			die("--store avx: this CPU (or its kernel) has no AVX");
	}
	map_buffer(o, &m);
	page_range(o, &m, &first, &count);
	install_fault_handler();
	c.m = &m;
	c.first = first;
	c.count = count;
	c.tag = o->tag;
	c.bad = 0;
	c.avx = o->store_avx;
	run_guarded(write_pages, &c, 0);
	bad = c.bad;
	if (m.is_file && msync((void *)m.base, m.size, MS_SYNC))
		die("msync %s: %s", m.what, strerror(errno));
	printf("{\"written\": %" PRIu64 ", \"tag\": %" PRIu64 ", \"store\": \"%s\", \"readback_ok\": %s",
	       count, o->tag, o->store_avx ? "avx" : "plain", bad ? "false" : "true");
	if (bad)
		printf(", \"readback_bad\": %" PRIu64, bad);
	printf("}\n");
	unmap_buffer(&m);
	return 0;
}

static volatile sig_atomic_t g_stop;

static void stop_handler(int sig)
{
	(void)sig;
	g_stop = 1;
}

struct watched {
	uint64_t page;
	int seen;
	uint64_t hdr[8];
	uint64_t generation;
	unsigned state;
	int status;
};

struct watch_ctx {
	const struct mapping *m;
	struct watched *w;
	size_t nw;
	struct timespec iv;
	uint64_t interval_us, t_end, reads;
};

static void watch_loop(void *arg)
{
	static uint64_t full[PAGE / 8];
	struct watch_ctx *c = arg;
	const struct mapping *m = c->m;
	size_t k;

	for (;;) {
		for (k = 0; k < c->nw && !g_stop; k++) {
			struct watched *x = &c->w[k];
			const volatile uint8_t *pg = m->base + x->page * PAGE;
			struct vmlab_stamp_hdr hh, *h = &hh;
			uint64_t hdr[8], t;
			int status;

			g_cur_page = (long)x->page;
			copy_words(hdr, pg, sizeof(hdr));
			t = now_ns();
			c->reads++;
			/*
			 * The full check (checksum + pattern) reruns only when the header
			 * changed or the last status was not ok, so a torn rewrite is
			 * followed until it settles.
			 */
			if (x->seen && !memcmp(hdr, x->hdr, sizeof(hdr)) &&
			    x->status == VMLAB_STAMP_OK)
				continue;
			/*
			 * One snapshot of the page judged and printed whole: its own header,
			 * not the one read before it (a mapping that flips between the two
			 * reads would make a page that never existed).  A torn page is then
			 * a real one, seen within this one pass.
			 */
			copy_words(full, pg, PAGE);
			t = now_ns();
			status = is_hole(full, 8) ? WATCH_HOLE : vmlab_stamp_check(full);
			memcpy(x->hdr, full, sizeof(hdr));
			memcpy(&hh, full, sizeof(hh));
			if (x->seen && h->generation == x->generation && h->state == x->state &&
			    status == x->status)
				continue;
			x->seen = 1;
			x->generation = h->generation;
			x->state = h->state;
			x->status = status;
			printf("{\"t_ns\": %" PRIu64 ", \"page\": %" PRIu64 ", \"generation\": %" PRIu64
			       ", \"state\": %u, \"status\": \"%s\"}\n", t, x->page, x->generation,
			       x->state, status_name(status));
			fflush(stdout);
		}
		if (g_stop || now_ns() >= c->t_end)
			break;
		if (c->interval_us)
			nanosleep(&c->iv, NULL);
		if (g_stop || now_ns() >= c->t_end)
			break;
	}
}

static int cmd_watch(const struct opts *o)
{
	struct mapping m;
	struct watched *w;
	size_t nw = 0;
	uint64_t t_start, t_end;
	struct sigaction sa;
	struct timespec iv;
	struct watch_ctx c;

	if (!o->have_duration)
		usage("watch needs --duration SECONDS");
	map_buffer(o, &m);
	w = calloc(m.pages + 2, sizeof(*w));
	if (!w)
		die("out of memory");
	if (o->pages) {
		const char *p = o->pages;

		while (*p) {
			char *end;
			unsigned long long v;

			errno = 0;
			if (*p < '0' || *p > '9')
				usage("bad --pages '%s' (want I,J,K)", o->pages);
			v = strtoull(p, &end, 0);
			if (errno || (*end && *end != ','))
				usage("bad --pages '%s' (want I,J,K)", o->pages);
			if (v >= m.pages)
				die("--pages: page %llu is beyond the last page (%" PRIu64 " pages)",
				    v, m.pages);
			if (nw >= m.pages + 2)
				die("--pages: too many pages");
			w[nw++].page = v;
			p = *end ? end + 1 : end;
		}
		if (!nw)
			usage("--pages is empty");
	} else {
		w[nw++].page = 0;
		if (m.pages > 1)
			w[nw++].page = m.pages - 1;
	}

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = stop_handler; /* no SA_RESTART: nanosleep returns early */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	install_fault_handler();

	iv.tv_sec = (time_t)(o->interval_us / 1000000u);
	iv.tv_nsec = (long)(o->interval_us % 1000000u) * 1000;
	t_start = now_ns();
	t_end = t_start + (uint64_t)(o->duration * 1e9);
	c.m = &m;
	c.w = w;
	c.nw = nw;
	c.iv = iv;
	c.interval_us = o->interval_us;
	c.t_end = t_end;
	c.reads = 0;
	run_guarded(watch_loop, &c, 1);
	printf("{\"done\": true, \"reads\": %" PRIu64 ", \"duration_ns\": %" PRIu64 "%s}\n", c.reads,
	       now_ns() - t_start, g_stop ? ", \"signal\": true" : "");
	fflush(stdout);
	free(w);
	unmap_buffer(&m);
	return 0;
}

static int cmd_pat(const struct opts *o)
{
	const char *list = o->pat_file ? o->pat_file : PAT_LIST;
	FILE *f;
	char line[256];
	int n = 0;

	if (!o->pat_file)
		ensure_debugfs();
	f = fopen(list, "re");
	if (!f)
		die("cannot open %s: %s", list, strerror(errno));
	if (o->have_phys) {
		struct memtype mt;

		lookup_memtype(o->phys, &mt, list);
		printf("{\"phys\": \"0x%" PRIx64 "\", \"memtype\": ", o->phys);
		json_str(stdout, mt.type);
		printf(", \"pat_line\": ");
		json_str(stdout, mt.found ? mt.line : NULL);
		printf(", \"lines\": [");
	} else {
		printf("{\"lines\": [");
	}
	while (fgets(line, sizeof(line), f)) {
		chomp(line);
		if (!*line)
			continue;
		printf("%s", n++ ? ", " : "");
		json_str(stdout, line);
	}
	fclose(f);
	printf("]}\n");
	return 0;
}

static uint64_t fnv1a64(const void *p, size_t n)
{
	const uint8_t *b = p;
	uint64_t h = 0xcbf29ce484222325ull;

	while (n--) {
		h ^= *b++;
		h *= 0x100000001b3ull;
	}
	return h;
}

static int cmd_vectors(const struct opts *o)
{
	static uint64_t page[PAGE / 8];
	FILE *f;
	char line[512];
	unsigned long n = 0, failed = 0, lineno = 0;
	unsigned long fl[64];
	unsigned nfl = 0, i;

	if (!o->vector_file)
		usage("vectors needs FILE");
	f = fopen(o->vector_file, "re");
	if (!f)
		die("cannot open %s: %s", o->vector_file, strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		unsigned long long id, gen, idx, state, csum, h64;
		char *p = line;
		int ok;

		lineno++;
		while (*p == ' ' || *p == '\t')
			p++;
		if (*p == '#' || *p == '\n' || *p == '\r' || !*p)
			continue;
		n++;
		memset(page, 0, sizeof(page));
		if (sscanf(p, "%llx %llx %llx %llx %llx %llx", &id, &gen, &idx, &state, &csum,
			   &h64) != 6 || state > 0xffff) {
			ok = 0;
		} else {
			vmlab_stamp_page(page, id, gen, idx, (vmlab_u16)state);
			ok = vmlab_stamp_checksum(page) == csum &&
			     ((const struct vmlab_stamp_hdr *)page)->checksum == csum &&
			     fnv1a64(page, VMLAB_STAMP_GUEST_OFF) == h64 &&
			     vmlab_stamp_check(page) == VMLAB_STAMP_OK;
		}
		if (!ok) {
			failed++;
			if (nfl < 64)
				fl[nfl++] = lineno;
		}
	}
	fclose(f);
	printf("{\"vectors\": %lu, \"failed\": %lu, \"failed_lines\": [", n, failed);
	for (i = 0; i < nfl; i++)
		printf("%s%lu", i ? ", " : "", fl[i]);
	printf("]}\n");
	if (!n)
		die("no vectors in %s", o->vector_file);
	if (failed)
		die("%lu of %lu vectors failed in %s", failed, n, o->vector_file);
	return 0;
}

static int dispatch(int argc, char **argv)
{
	struct opts o;
	static const struct {
		const char *name;
		int (*fn)(const struct opts *);
	} cmds[] = {
		{ "find", cmd_find }, { "map", cmd_map }, { "read", cmd_read },
		{ "write", cmd_write }, { "watch", cmd_watch }, { "vectors", cmd_vectors },
		{ "pat", cmd_pat }, { "version", cmd_version }, { "virtio-start", cmd_virtio_start },
		{ "kernel-state", cmd_kernel_state },
	};
	size_t i;

	if (argc < 2)
		usage("missing command");
	g_cmd = argv[1];
	if (!strcmp(argv[1], "gpu"))
		return gpu_main(argc - 1, argv + 1);
	for (i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		if (!strcmp(argv[1], cmds[i].name)) {
			parse_opts(argc, argv, &o);
			return cmds[i].fn(&o);
		}
	}
	usage("unknown command '%s'", argv[1]);
	return 2;
}

/* ------------------------------------------------------------------ */
/* serve: one process for a run's commands                             */

static int write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;

	while (n) {
		ssize_t w = write(fd, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

struct grow {
	char *b;
	size_t len, cap;
};

static int grow_read(int fd, struct grow *g)
{
	ssize_t r;

	if (g->len == g->cap) {
		size_t cap = g->cap ? 2 * g->cap : 65536;
		char *nb = realloc(g->b, cap);

		if (!nb)
			return -1;
		g->b = nb;
		g->cap = cap;
	}
	r = read(fd, g->b + g->len, g->cap - g->len);
	if (r > 0)
		g->len += (size_t)r;
	return r < 0 && errno == EINTR ? 1 : (int)(r > 0);
}

/*
 * Each line on stdin is one command line ("read --caching uc"). It runs in a forked
 * child exactly as it would as its own process (die(), the SIGBUS guard, exit code 3 on
 * a guest fault), and the answer is framed on stdout:
 *     VMLAB-REPLY <exit status> <stdout bytes> <stderr bytes>\n<stdout><stderr>
 * So a move's read is one round trip on the controller's channel, not an SSH exec.
 */
static int cmd_serve(void)
{
	char line[4096];

	/* an inherited SIG_IGN would make waitpid() fail and every status look like 0 */
	signal(SIGCHLD, SIG_DFL);
	while (fgets(line, sizeof(line), stdin)) {
		char *argv[34], *save = NULL, *tok = NULL;
		int argc = 1, out[2], err[2], status = 0, rc;
		struct grow o = { 0 }, e = { 0 };
		char hdr[96];
		pid_t pid;

		if (!strchr(line, '\n') && !feof(stdin)) {
			static const char msg[] = "command line longer than 4095 bytes\n";
			int c;

			while ((c = getchar()) != EOF && c != '\n')
				;   /* the rest of it is no command of its own */
			snprintf(hdr, sizeof(hdr), "VMLAB-REPLY 2 0 %zu\n", sizeof(msg) - 1);
			if (write_all(1, hdr, strlen(hdr)) || write_all(1, msg, sizeof(msg) - 1))
				return 1;
			continue;
		}
		line[strcspn(line, "\r\n")] = 0;
		argv[0] = "vmlab-guest-agent";
		for (tok = strtok_r(line, " \t", &save); tok && argc < 33; tok = strtok_r(NULL, " \t", &save))
			argv[argc++] = tok;
		argv[argc] = NULL;
		if (tok || argc == 1 || !strcmp(argv[1], "serve") || !strcmp(argv[1], "watch")) {
			static const char msg[] = "serve runs one-shot commands of at most 32 words "
						  "(not serve, watch)\n";

			snprintf(hdr, sizeof(hdr), "VMLAB-REPLY 2 0 %zu\n", sizeof(msg) - 1);
			if (write_all(1, hdr, strlen(hdr)) || write_all(1, msg, sizeof(msg) - 1))
				return 1;
			continue;
		}
		if (pipe(out) || pipe(err))
			die("pipe: %s", strerror(errno));
		fflush(stdout);
		pid = fork();
		if (pid < 0)
			die("fork: %s", strerror(errno));
		if (!pid) {
			int null = open("/dev/null", O_RDONLY);

			if (null >= 0)
				dup2(null, 0);   /* the command channel is the server's, not the child's */
			dup2(out[1], 1);
			dup2(err[1], 2);
			close(out[0]);
			close(out[1]);
			close(err[0]);
			close(err[1]);
			rc = dispatch(argc, argv);
			fflush(stdout);
			fflush(stderr);
			_exit(rc);
		}
		close(out[1]);
		close(err[1]);
		for (int open_fds = 2; open_fds;) {
			/* no timeout here: the controller bounds every command, and a child that
			 * ends (as every agent command does) closes both pipes */
			struct pollfd pf[2] = { { out[0], POLLIN, 0 }, { err[0], POLLIN, 0 } };

			open_fds = 0;
			if (poll(pf, 2, -1) < 0 && errno != EINTR)
				die("poll: %s", strerror(errno));
			for (int k = 0; k < 2; k++) {
				int fd = k ? err[0] : out[0];

				if (fd < 0)
					continue;
				if (pf[k].revents && (rc = grow_read(fd, k ? &e : &o)) <= 0) {
					if (rc < 0)
						die("out of memory for a reply");
					close(fd);
					if (k)
						err[0] = -1;
					else
						out[0] = -1;
					continue;
				}
				open_fds++;
			}
		}
		while ((rc = (int)waitpid(pid, &status, 0)) < 0 && errno == EINTR)
			;
		if (rc < 0)
			die("waitpid: %s", strerror(errno));   /* never a made-up status */
		rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		snprintf(hdr, sizeof(hdr), "VMLAB-REPLY %d %zu %zu\n", rc, o.len, e.len);
		if (write_all(1, hdr, strlen(hdr)) || write_all(1, o.b ? o.b : "", o.len) ||
		    write_all(1, e.b ? e.b : "", e.len))
			return 1;
		free(o.b);
		free(e.b);
	}
	return 0;
}

/*
 * reseed HEX: credit the host's bytes to the input pool and make the kernel reseed its
 * CRNG now.  A guest restored from a lab snapshot runs on the RNG state every restore of
 * that snapshot shares; writing to /dev/urandom only mixes, and the next reseed may be
 * a minute away.  RNDRESEEDCRNG is 4.17 and later: older kernels get the credit only.
 */
static int cmd_reseed(int argc, char **argv)
{
	unsigned char buf[64];
	struct rand_pool_info *info;
	const char *h;
	size_t n = 0;
	int fd;

	if (argc != 3)
		usage("reseed needs HEX (the host's bytes)");
	for (h = argv[2]; h[0] && h[1] && n < sizeof(buf); h += 2) {
		unsigned int b;

		if (!isxdigit((unsigned char)h[0]) || !isxdigit((unsigned char)h[1]) ||
		    sscanf(h, "%2x", &b) != 1)
			usage("reseed: not hex: '%s'", argv[2]);
		buf[n++] = (unsigned char)b;
	}
	if (n < 16 || *h)
		usage("reseed wants 16 to 64 bytes in hex");
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die("/dev/urandom: %s", strerror(errno));
	info = calloc(1, sizeof(*info) + sizeof(buf));
	if (!info)
		die("out of memory");
	info->entropy_count = (int)n * 8;
	info->buf_size = (int)n;
	memcpy(info->buf, buf, n);
	if (ioctl(fd, RNDADDENTROPY, info))
		die("RNDADDENTROPY: %s", strerror(errno));
	free(info);
#ifdef RNDRESEEDCRNG
	if (ioctl(fd, RNDRESEEDCRNG) && errno != EINVAL && errno != ENOTTY)
		die("RNDRESEEDCRNG: %s", strerror(errno));
#endif
	close(fd);
	printf("{\"reseeded\": %zu}\n", n);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "reseed")) {
		g_cmd = argv[1];
		return cmd_reseed(argc, argv);
	}
	if (argc == 2 && !strcmp(argv[1], "serve"))
		return cmd_serve();
	return dispatch(argc, argv);
}

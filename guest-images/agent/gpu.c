// SPDX-License-Identifier: GPL-2.0
/*
 * vmlab-guest-agent gpu ...: virtio-gpu probes through the DRM uapi (ioctl()
 * only, no libdrm).  Dispatched from main() as argv[1] == "gpu".
 *
 *   gpu probe [--card /dev/dri/card0]
 *   gpu blob-scanout --seed S [--width 64 --height 64] [--hold SECONDS]
 *                    [--rewrite-seed S2 --rewrite-after SECONDS] [--card PATH]
 *   gpu host-blob [--size 65536] [--seed S] [--blob-id N] [--capset ID]
 *                 [--virgl-flags F] [--card PATH]
 *
 * Conventions are the agent's: one JSON object on stdout (blob-scanout with
 * --rewrite-seed prints two lines: the scanout object, then
 * {"rewritten": true, ...}); errors are one line on stderr
 * "vmlab-guest-agent: gpu SUB: ..." naming the ioctl and errno, exit 1;
 * usage errors exit 2; SIGBUS/SIGSEGV while touching a mapping prints
 * {"error": "SIGBUS", "phase": ...} and exits 3.
 *
 * Scanout pixel formula (XRGB8888, little endian, W = the fb width reported):
 *   pixel(x, y) = 0xFF000000 | (vmlab_splitmix64(seed * 1000003 + y * W + x) & 0xFFFFFF)
 * i.e. R = bits 16..23, G = bits 8..15, B = bits 0..7 (vmlab/gpu.py mirrors it).
 *
 * host-blob word i (u64 little endian) = vmlab_splitmix64(seed + i).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "drm-uapi/drm.h"
#include "drm-uapi/drm_mode.h"
#include "drm-uapi/virtgpu_drm.h"
#include "agent-common.h"
#include "gpu.h"
#include "vmlab_stamp.h"

#define GPU_DEFAULT_CARD "/dev/dri/card0"
#define GPU_DEBUGFS AGENT_DEBUGFS
#define GPU_PAT_LIST AGENT_PAT_LIST
#define GPU_HOST_VISIBLE_MM GPU_DEBUGFS "/dri/0/virtio-gpu-host-visible-mm"

/* drm_fourcc.h is not vendored: the one format we need. */
#define GPU_FOURCC(a, b, c, d) \
	((uint32_t)(a) | ((uint32_t)(b) << 8) | ((uint32_t)(c) << 16) | ((uint32_t)(d) << 24))
#define GPU_FORMAT_XRGB8888 GPU_FOURCC('X', 'R', '2', '4')

/*
 * virgl protocol (virglrenderer src/virgl_protocol.h, virgl_hw.h; Mesa
 * virgl_drm_winsys.c virgl_drm_winsys_resource_create_blob uses the same).
 * The dword indices count the header as dword 0.
 */
#define VIRGL_CMD0(cmd, obj, len) ((uint32_t)(cmd) | ((uint32_t)(obj) << 8) | ((uint32_t)(len) << 16))
#define VIRGL_CCMD_PIPE_RESOURCE_CREATE 48
#define VIRGL_PIPE_RES_CREATE_SIZE 11
#define VIRGL_PIPE_RES_CREATE_TARGET 1
#define VIRGL_PIPE_RES_CREATE_FORMAT 2
#define VIRGL_PIPE_RES_CREATE_BIND 3
#define VIRGL_PIPE_RES_CREATE_WIDTH 4
#define VIRGL_PIPE_RES_CREATE_HEIGHT 5
#define VIRGL_PIPE_RES_CREATE_DEPTH 6
#define VIRGL_PIPE_RES_CREATE_ARRAY_SIZE 7
#define VIRGL_PIPE_RES_CREATE_LAST_LEVEL 8
#define VIRGL_PIPE_RES_CREATE_NR_SAMPLES 9
#define VIRGL_PIPE_RES_CREATE_FLAGS 10
#define VIRGL_PIPE_RES_CREATE_BLOB_ID 11
#define VIRGL_PIPE_BUFFER 0                       /* enum pipe_texture_target */
#define VIRGL_FORMAT_R8_UNORM 64
#define VIRGL_BIND_VERTEX_BUFFER (1u << 4)
#define VIRGL_RESOURCE_FLAG_MAP_PERSISTENT (1u << 1)
#define VIRGL_RESOURCE_FLAG_MAP_COHERENT (1u << 2)

/* virtio_gpu map_info values (include/uapi/linux/virtio_gpu.h) */
#define GPU_MAP_CACHE_CACHED 1
#define GPU_MAP_CACHE_UNCACHED 2
#define GPU_MAP_CACHE_WC 3

/* ------------------------------------------------------------------ */
/* errors, usage, JSON                                                 */

static const char *g_sub = "";

static void __attribute__((noreturn, format(printf, 1, 2))) gdie(const char *fmt, ...)
{
	va_list ap;
	char prefix[64];

	snprintf(prefix, sizeof(prefix), "gpu%s%s: ", *g_sub ? " " : "", g_sub);
	va_start(ap, fmt);
	agent_vfail(1, prefix, "", fmt, ap);
}

/* An ioctl failed: name it and errno (errno is read before anything else). */
static void __attribute__((noreturn)) die_ioctl(const char *name)
{
	int e = errno;

	gdie("%s: %s", name, strerror(e));
}

static void __attribute__((noreturn, format(printf, 1, 2))) gusage(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	agent_vfail(2, "usage: gpu: ", " (gpu probe [--card PATH]; "
		    "gpu blob-scanout --seed S [--width W --height H] [--hold SECONDS] "
		    "[--rewrite-seed S2 --rewrite-after SECONDS]; gpu host-blob [--size BYTES] "
		    "[--seed S] [--blob-id N] [--capset ID] [--virgl-flags F] [--hold SECONDS])", fmt, ap);
}

static void jstr(const char *s)
{
	agent_json_str(stdout, s);
}

/* ------------------------------------------------------------------ */
/* options                                                             */

struct gopts {
	const char *card;
	int have_seed, have_rewrite_seed, have_rewrite_after, have_capset;
	uint64_t seed, rewrite_seed, size, blob_id, capset, virgl_flags;
	uint64_t width, height;
	double hold, rewrite_after;
};

static uint64_t gparse_u64(const char *opt, const char *s)
{
	uint64_t v = 0;

	switch (agent_parse_u64(s, &v)) {
	case -1:
		gusage("%s needs a non-negative integer", opt);
	case -2:
		gusage("bad value for %s: '%s'", opt, s);
	}
	return v;
}

static double gparse_secs(const char *opt, const char *s)
{
	char *end;
	double v;

	if (!s || !*s)
		gusage("%s needs a number of seconds", opt);
	errno = 0;
	v = strtod(s, &end);
	if (errno || *end || !(v >= 0) || v > 1e7)
		gusage("bad value for %s: '%s'", opt, s);
	return v;
}

/* allowed: space-separated option names that take a value */
static void gparse(int argc, char **argv, const char *allowed, struct gopts *o)
{
	int i;

	memset(o, 0, sizeof(*o));
	o->card = GPU_DEFAULT_CARD;
	o->width = 64;
	o->height = 64;
	o->size = 65536;
	o->blob_id = 1;
	o->virgl_flags = VIRGL_RESOURCE_FLAG_MAP_PERSISTENT | VIRGL_RESOURCE_FLAG_MAP_COHERENT;
	for (i = 2; i < argc; i++) {
		const char *a = argv[i], *v;
		char key[64];

		if (strncmp(a, "--", 2) || strlen(a) >= sizeof(key) - 2)
			gusage("unexpected argument '%s'", a);
		snprintf(key, sizeof(key), " %s ", a);
		{
			char list[512];

			snprintf(list, sizeof(list), " %s ", allowed);
			if (!strstr(list, key))
				gusage("unknown option '%s' for gpu %s", a, argv[1]);
		}
		if (i + 1 >= argc)
			gusage("option %s needs a value", a);
		v = argv[++i];
		if (!strcmp(a, "--card")) {
			if (!*v)
				gusage("--card needs a path");
			o->card = v;
		} else if (!strcmp(a, "--seed")) {
			o->seed = gparse_u64(a, v);
			o->have_seed = 1;
		} else if (!strcmp(a, "--width")) {
			o->width = gparse_u64(a, v);
		} else if (!strcmp(a, "--height")) {
			o->height = gparse_u64(a, v);
		} else if (!strcmp(a, "--hold")) {
			o->hold = gparse_secs(a, v);
		} else if (!strcmp(a, "--rewrite-seed")) {
			o->rewrite_seed = gparse_u64(a, v);
			o->have_rewrite_seed = 1;
		} else if (!strcmp(a, "--rewrite-after")) {
			o->rewrite_after = gparse_secs(a, v);
			o->have_rewrite_after = 1;
		} else if (!strcmp(a, "--size")) {
			o->size = gparse_u64(a, v);
		} else if (!strcmp(a, "--blob-id")) {
			o->blob_id = gparse_u64(a, v);
		} else if (!strcmp(a, "--capset")) {
			o->capset = gparse_u64(a, v);
			o->have_capset = 1;
		} else if (!strcmp(a, "--virgl-flags")) {
			o->virgl_flags = gparse_u64(a, v);
		}
	}
}

/* ------------------------------------------------------------------ */
/* helpers                                                             */

static int xioctl(int fd, unsigned long req, void *arg)
{
	int r;

	do {
		r = ioctl(fd, req, arg);
	} while (r == -1 && (errno == EINTR || errno == EAGAIN));
	return r;
}

static void sleep_secs(double s)
{
	struct timespec ts;

	if (s <= 0)
		return;
	ts.tv_sec = (time_t)s;
	ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

static int open_card(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		gdie("open %s: %s", path, strerror(errno));
	return fd;
}

/* DRM_IOCTL_VERSION; dies unless the driver is virtio_gpu (driver-private
 * ioctl numbers mean different things on other drivers). */
static void check_driver(int fd, const char *path, char *name, size_t name_len, char *ver,
			 size_t ver_len)
{
	struct drm_version v;
	char desc[128], date[64];

	memset(&v, 0, sizeof(v));
	memset(name, 0, name_len);
	v.name = name;
	v.name_len = name_len - 1;
	v.desc = desc;
	v.desc_len = sizeof(desc) - 1;
	v.date = date;
	v.date_len = sizeof(date) - 1;
	if (xioctl(fd, DRM_IOCTL_VERSION, &v))
		die_ioctl("DRM_IOCTL_VERSION");
	name[name_len - 1] = 0;
	if ((size_t)v.name_len < name_len)
		name[v.name_len] = 0;
	snprintf(ver, ver_len, "%d.%d.%d", v.version_major, v.version_minor,
		 v.version_patchlevel);
	if (strcmp(name, "virtio_gpu"))
		gdie("%s is driver '%s', not virtio_gpu", path, name);
}

static const struct {
	uint64_t param;
	const char *key;
} g_params[] = {
	{ VIRTGPU_PARAM_3D_FEATURES, "3d_features" },
	{ VIRTGPU_PARAM_CAPSET_QUERY_FIX, "capset_query_fix" },
	{ VIRTGPU_PARAM_RESOURCE_BLOB, "resource_blob" },
	{ VIRTGPU_PARAM_HOST_VISIBLE, "host_visible" },
	{ VIRTGPU_PARAM_CROSS_DEVICE, "cross_device" },
	{ VIRTGPU_PARAM_CONTEXT_INIT, "context_init" },
	{ VIRTGPU_PARAM_SUPPORTED_CAPSET_IDs, "supported_capset_ids" },
};
#define N_PARAMS (sizeof(g_params) / sizeof(g_params[0]))

/*
 * DRM_IOCTL_VIRTGPU_GETPARAM: the kernel writes an int to the user pointer in
 * .value (virtio_gpu_getparam_ioctl), it does not fill .value itself.
 * Returns 0 or the errno.
 */
static int getparam(int fd, uint64_t param, int *value)
{
	struct drm_virtgpu_getparam gp;
	int v = 0;

	memset(&gp, 0, sizeof(gp));
	gp.param = param;
	gp.value = (uint64_t)(uintptr_t)&v;
	if (xioctl(fd, DRM_IOCTL_VIRTGPU_GETPARAM, &gp))
		return errno ? errno : EIO;
	*value = v;
	return 0;
}

struct params {
	int value[N_PARAMS];
	int err[N_PARAMS];
};

static void get_all_params(int fd, struct params *p)
{
	size_t i;

	for (i = 0; i < N_PARAMS; i++) {
		p->value[i] = 0;
		p->err[i] = getparam(fd, g_params[i].param, &p->value[i]);
		if (p->err[i])
			p->value[i] = 0;
	}
}

static int param_of(const struct params *p, uint64_t param)
{
	size_t i;

	for (i = 0; i < N_PARAMS; i++)
		if (g_params[i].param == param)
			return p->value[i];
	return 0;
}

static void print_capsets(unsigned int mask)
{
	int i, n = 0;

	putchar('[');
	for (i = 0; i < 32; i++)
		if (mask & (1u << i))
			printf("%s%d", n++ ? ", " : "", i);
	putchar(']');
}

/* ------------------------------------------------------------------ */
/* SIGBUS / SIGSEGV on a mapping                                       */

static const char *volatile g_phase = "";

static void gpu_fault(int sig)
{
	char buf[256];
	int n;

	n = snprintf(buf, sizeof(buf), "{\"error\": \"%s\", \"phase\": \"%s\"}\n",
		     sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", g_phase);
	if (n > 0 && write(1, buf, (size_t)n) < 0)
		_exit(3);
	_exit(3);
}

static void gpu_install_fault(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = gpu_fault;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, NULL);
	sigaction(SIGSEGV, &sa, NULL);
}

/* ------------------------------------------------------------------ */
/* gpu probe                                                           */

static int gpu_probe(int argc, char **argv)
{
	struct gopts o;
	struct params p;
	char name[64], ver[64];
	size_t i;
	int fd, n = 0;

	gparse(argc, argv, "--card", &o);
	fd = open_card(o.card);
	check_driver(fd, o.card, name, sizeof(name), ver, sizeof(ver));
	get_all_params(fd, &p);
	printf("{\"card\": ");
	jstr(o.card);
	printf(", \"driver\": ");
	jstr(name);
	printf(", \"driver_version\": ");
	jstr(ver);
	for (i = 0; i < N_PARAMS; i++) {
		if (g_params[i].param == VIRTGPU_PARAM_SUPPORTED_CAPSET_IDs)
			continue;
		printf(", \"%s\": %s", g_params[i].key, p.value[i] ? "true" : "false");
	}
	printf(", \"capset_mask\": %u, \"capsets\": ",
	       (unsigned int)param_of(&p, VIRTGPU_PARAM_SUPPORTED_CAPSET_IDs));
	print_capsets((unsigned int)param_of(&p, VIRTGPU_PARAM_SUPPORTED_CAPSET_IDs));
	printf(", \"params_errno\": {");
	for (i = 0; i < N_PARAMS; i++)
		if (p.err[i])
			printf("%s\"%s\": %d", n++ ? ", " : "", g_params[i].key, p.err[i]);
	printf("}}\n");
	close(fd);
	return 0;
}

/* ------------------------------------------------------------------ */
/* gpu blob-scanout                                                    */

struct kms {
	uint32_t connector_id, encoder_id, crtc_id;
	struct drm_mode_modeinfo mode;
};

static void *xcalloc(size_t n, size_t sz)
{
	void *p = calloc(n ? n : 1, sz);

	if (!p)
		gdie("out of memory");
	return p;
}

static void find_output(int fd, uint64_t want_w, uint64_t want_h, struct kms *k)
{
	struct drm_mode_card_res res;
	uint32_t *crtcs, *conns, *encs;
	uint32_t i;
	int found = 0;

	memset(&res, 0, sizeof(res));
	if (xioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &res))
		die_ioctl("DRM_IOCTL_MODE_GETRESOURCES");
	crtcs = xcalloc(res.count_crtcs, sizeof(uint32_t));
	conns = xcalloc(res.count_connectors, sizeof(uint32_t));
	encs = xcalloc(res.count_encoders, sizeof(uint32_t));
	res.count_fbs = 0;
	res.fb_id_ptr = 0;
	res.crtc_id_ptr = (uint64_t)(uintptr_t)crtcs;
	res.connector_id_ptr = (uint64_t)(uintptr_t)conns;
	res.encoder_id_ptr = (uint64_t)(uintptr_t)encs;
	{
		uint32_t nc = res.count_crtcs, nn = res.count_connectors, ne = res.count_encoders;

		if (xioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &res))
			die_ioctl("DRM_IOCTL_MODE_GETRESOURCES");
		/* the kernel fills at most what we gave room for */
		if (res.count_crtcs > nc)
			res.count_crtcs = nc;
		if (res.count_connectors > nn)
			res.count_connectors = nn;
		if (res.count_encoders > ne)
			res.count_encoders = ne;
	}
	if (!res.count_crtcs)
		gdie("DRM_IOCTL_MODE_GETRESOURCES: no CRTC");
	if (!res.count_connectors)
		gdie("DRM_IOCTL_MODE_GETRESOURCES: no connector");

	for (i = 0; i < res.count_connectors && !found; i++) {
		struct drm_mode_get_connector c;
		struct drm_mode_modeinfo *modes = NULL;
		uint32_t *cencs = NULL;
		uint32_t m;
		int tries;

		for (tries = 0; tries < 5; tries++) {
			uint32_t nm, nen;

			memset(&c, 0, sizeof(c));
			c.connector_id = conns[i];
			/* count_modes == 0: the kernel probes the connector (we are master) */
			if (xioctl(fd, DRM_IOCTL_MODE_GETCONNECTOR, &c))
				die_ioctl("DRM_IOCTL_MODE_GETCONNECTOR");
			nm = c.count_modes;
			nen = c.count_encoders;
			free(modes);
			free(cencs);
			modes = xcalloc(nm, sizeof(*modes));
			cencs = xcalloc(nen, sizeof(uint32_t));
			c.count_props = 0;
			c.props_ptr = 0;
			c.prop_values_ptr = 0;
			c.modes_ptr = (uint64_t)(uintptr_t)modes;
			c.encoders_ptr = (uint64_t)(uintptr_t)cencs;
			if (xioctl(fd, DRM_IOCTL_MODE_GETCONNECTOR, &c))
				die_ioctl("DRM_IOCTL_MODE_GETCONNECTOR");
			if (c.count_modes <= nm && c.count_encoders <= nen)
				break;
		}
		if (tries == 5)
			gdie("DRM_IOCTL_MODE_GETCONNECTOR: connector %u keeps changing", conns[i]);
		if (c.connection == 1 /* DRM_MODE_CONNECTED */ && c.count_modes) {
			for (m = 0; m < c.count_modes; m++) {
				if (modes[m].hdisplay >= want_w && modes[m].vdisplay >= want_h) {
					k->mode = modes[m];
					k->connector_id = c.connector_id;
					k->encoder_id = c.encoder_id;
					if (!k->encoder_id && c.count_encoders)
						k->encoder_id = cencs[0];
					found = 1;
					break;
				}
			}
			if (!found)
				gdie("connector %u is connected but has no mode of at least %" PRIu64
				     "x%" PRIu64 " (first mode %ux%u)", c.connector_id, want_w,
				     want_h, modes[0].hdisplay, modes[0].vdisplay);
		}
		free(modes);
		free(cencs);
	}
	if (!found)
		gdie("no connected connector with modes (of %u connectors)", res.count_connectors);

	k->crtc_id = 0;
	if (k->encoder_id) {
		struct drm_mode_get_encoder e;

		memset(&e, 0, sizeof(e));
		e.encoder_id = k->encoder_id;
		if (xioctl(fd, DRM_IOCTL_MODE_GETENCODER, &e))
			die_ioctl("DRM_IOCTL_MODE_GETENCODER");
		k->crtc_id = e.crtc_id;
		if (!k->crtc_id) /* first CRTC this encoder can drive */
			for (i = 0; i < res.count_crtcs && i < 32; i++)
				if (e.possible_crtcs & (1u << i)) {
					k->crtc_id = crtcs[i];
					break;
				}
	}
	if (!k->crtc_id)
		k->crtc_id = crtcs[0];
	free(crtcs);
	free(conns);
	free(encs);
}

static void fill_pattern(volatile uint32_t *px, uint32_t w, uint32_t h, uint32_t pitch,
			 uint64_t seed)
{
	uint64_t base = seed * 1000003ull;
	uint32_t x, y;

	for (y = 0; y < h; y++) {
		volatile uint32_t *row = px + (size_t)y * (pitch / 4);

		for (x = 0; x < w; x++)
			row[x] = 0xFF000000u |
				 (uint32_t)(vmlab_splitmix64(base + (uint64_t)y * w + x) & 0x00FFFFFFu);
	}
}

static void dirty_fb(int fd, uint32_t fb_id, uint32_t w, uint32_t h)
{
	struct drm_clip_rect clip;
	struct drm_mode_fb_dirty_cmd d;

	memset(&clip, 0, sizeof(clip));
	clip.x1 = 0;
	clip.y1 = 0;
	clip.x2 = (unsigned short)w;
	clip.y2 = (unsigned short)h;
	memset(&d, 0, sizeof(d));
	d.fb_id = fb_id;
	d.num_clips = 1;
	d.clips_ptr = (uint64_t)(uintptr_t)&clip;
	if (xioctl(fd, DRM_IOCTL_MODE_DIRTYFB, &d))
		die_ioctl("DRM_IOCTL_MODE_DIRTYFB");
}

static int gpu_blob_scanout(int argc, char **argv)
{
	struct gopts o;
	struct kms k;
	struct drm_virtgpu_resource_create_blob cb;
	struct drm_virtgpu_map mp;
	struct drm_mode_fb_cmd2 fb;
	struct drm_mode_crtc crtc;
	char name[64], ver[64];
	uint32_t w, h, pitch, conn;
	uint64_t size;
	void *map;
	int fd;

	gparse(argc, argv, "--card --seed --width --height --hold --rewrite-seed --rewrite-after",
	       &o);
	if (!o.have_seed)
		gusage("blob-scanout needs --seed S");
	if (o.have_rewrite_seed != o.have_rewrite_after)
		gusage("--rewrite-seed and --rewrite-after go together");
	if (!o.width || !o.height || o.width > 16384 || o.height > 16384)
		gusage("--width/--height must be 1..16384");

	fd = open_card(o.card);
	check_driver(fd, o.card, name, sizeof(name), ver, sizeof(ver));
	if (xioctl(fd, DRM_IOCTL_SET_MASTER, NULL))
		die_ioctl("DRM_IOCTL_SET_MASTER");
	memset(&k, 0, sizeof(k));
	find_output(fd, o.width, o.height, &k);
	/* the fb covers the whole mode (>= the requested size) */
	w = k.mode.hdisplay;
	h = k.mode.vdisplay;
	pitch = w * 4;
	size = ((uint64_t)pitch * h + 4095) & ~4095ull;

	memset(&cb, 0, sizeof(cb));
	cb.blob_mem = VIRTGPU_BLOB_MEM_GUEST;
	cb.blob_flags = VIRTGPU_BLOB_FLAG_USE_MAPPABLE | VIRTGPU_BLOB_FLAG_USE_SHAREABLE;
	cb.size = size;
	if (xioctl(fd, DRM_IOCTL_VIRTGPU_RESOURCE_CREATE_BLOB, &cb))
		die_ioctl("DRM_IOCTL_VIRTGPU_RESOURCE_CREATE_BLOB");
	memset(&mp, 0, sizeof(mp));
	mp.handle = cb.bo_handle;
	if (xioctl(fd, DRM_IOCTL_VIRTGPU_MAP, &mp))
		die_ioctl("DRM_IOCTL_VIRTGPU_MAP");
	map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)mp.offset);
	if (map == MAP_FAILED)
		gdie("mmap %s at offset 0x%" PRIx64 " (%" PRIu64 " bytes): %s", o.card,
		     (uint64_t)mp.offset, size, strerror(errno));
	gpu_install_fault();
	g_phase = "blob-scanout write";
	fill_pattern(map, w, h, pitch, o.seed);

	memset(&fb, 0, sizeof(fb));
	fb.width = w;
	fb.height = h;
	fb.pixel_format = GPU_FORMAT_XRGB8888;
	fb.handles[0] = cb.bo_handle;
	fb.pitches[0] = pitch;
	fb.offsets[0] = 0;
	if (xioctl(fd, DRM_IOCTL_MODE_ADDFB2, &fb))
		die_ioctl("DRM_IOCTL_MODE_ADDFB2");

	conn = k.connector_id;
	memset(&crtc, 0, sizeof(crtc));
	crtc.crtc_id = k.crtc_id;
	crtc.fb_id = fb.fb_id;
	crtc.x = 0;
	crtc.y = 0;
	crtc.set_connectors_ptr = (uint64_t)(uintptr_t)&conn;
	crtc.count_connectors = 1;
	crtc.mode = k.mode;
	crtc.mode_valid = 1;
	if (xioctl(fd, DRM_IOCTL_MODE_SETCRTC, &crtc))
		die_ioctl("DRM_IOCTL_MODE_SETCRTC");
	dirty_fb(fd, fb.fb_id, w, h);

	printf("{\"ok\": true, \"width\": %u, \"height\": %u, \"pitch\": %u, \"seed\": %" PRIu64
	       ", \"requested_width\": %" PRIu64 ", \"requested_height\": %" PRIu64
	       ", \"fb_id\": %u, \"crtc_id\": %u, \"connector_id\": %u, \"bo_handle\": %u"
	       ", \"res_handle\": %u, \"size\": %" PRIu64 ", \"mode\": \"%ux%u\", \"mode_name\": ",
	       w, h, pitch, o.seed, o.width, o.height, fb.fb_id, k.crtc_id, k.connector_id,
	       cb.bo_handle, cb.res_handle, size, k.mode.hdisplay, k.mode.vdisplay);
	k.mode.name[DRM_DISPLAY_MODE_LEN - 1] = 0;
	jstr(k.mode.name);
	printf(", \"format\": \"XRGB8888\", \"hold\": %g}\n", o.hold);
	fflush(stdout);

	if (o.have_rewrite_seed) {
		sleep_secs(o.rewrite_after);
		g_phase = "blob-scanout rewrite";
		fill_pattern(map, w, h, pitch, o.rewrite_seed);
		dirty_fb(fd, fb.fb_id, w, h);
		printf("{\"rewritten\": true, \"seed\": %" PRIu64 ", \"fb_id\": %u, \"width\": %u"
		       ", \"height\": %u}\n", o.rewrite_seed, fb.fb_id, w, h);
		fflush(stdout);
	}
	sleep_secs(o.hold);
	munmap(map, size);
	close(fd);
	return 0;
}

/* ------------------------------------------------------------------ */
/* gpu host-blob                                                       */

struct linelist {
	char **v;
	size_t n;
};

static void ll_free(struct linelist *l)
{
	size_t i;

	for (i = 0; i < l->n; i++)
		free(l->v[i]);
	free(l->v);
	l->v = NULL;
	l->n = 0;
}

/* Read a text file into lines; returns 0 or the errno. */
static int read_lines(const char *path, struct linelist *l)
{
	FILE *f = fopen(path, "re");
	char line[512];

	l->v = NULL;
	l->n = 0;
	if (!f)
		return errno ? errno : EIO;
	while (fgets(line, sizeof(line), f)) {
		size_t len = strlen(line);
		char **nv;

		while (len && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' '))
			line[--len] = 0;
		if (!len)
			continue;
		nv = realloc(l->v, (l->n + 1) * sizeof(char *));
		if (!nv)
			gdie("out of memory");
		l->v = nv;
		l->v[l->n] = strdup(line);
		if (!l->v[l->n])
			gdie("out of memory");
		l->n++;
	}
	fclose(f);
	return 0;
}

static int ll_has(const struct linelist *l, const char *s)
{
	size_t i;

	for (i = 0; i < l->n; i++)
		if (!strcmp(l->v[i], s))
			return 1;
	return 0;
}

static void gpu_ensure_debugfs(void)
{
	/* best effort: the PAT evidence is optional, its absence is reported */
	(void)agent_mount_debugfs();
}

/* "PAT: [mem 0xS-0xE] type": the type of the entry covering phys, or NULL */
static const char *pat_lookup(const struct linelist *l, uint64_t phys, const char **line)
{
	size_t i;

	for (i = 0; i < l->n; i++) {
		unsigned long long s, e;
		const char *type;

		if (agent_parse_pat_line(l->v[i], &s, &e, &type) == 0 && phys >= s && phys < e) {
			*line = l->v[i];
			return type;
		}
	}
	return NULL;
}

static int memtype_to_map_info(const char *t)
{
	if (!t)
		return 0;
	if (!strcmp(t, "write-combining"))
		return GPU_MAP_CACHE_WC;
	if (!strcmp(t, "uncached-minus") || !strcmp(t, "uncached"))
		return GPU_MAP_CACHE_UNCACHED;
	if (!strcmp(t, "write-back"))
		return GPU_MAP_CACHE_CACHED;
	return 0;
}

/* /proc/self/pagemap entry of vaddr: phys address, or 0 with *why set */
static uint64_t virt_to_phys(const void *vaddr, const char **why)
{
	uint64_t ent = 0;
	off_t off = (off_t)(((uintptr_t)vaddr / 4096) * 8);
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);

	*why = NULL;
	if (fd < 0) {
		*why = "cannot open /proc/self/pagemap";
		return 0;
	}
	if (pread(fd, &ent, sizeof(ent), off) != (ssize_t)sizeof(ent)) {
		close(fd);
		*why = "cannot read /proc/self/pagemap";
		return 0;
	}
	close(fd);
	if (!(ent & (1ull << 63))) {
		*why = "page not present in /proc/self/pagemap";
		return 0;
	}
	if (!(ent & ((1ull << 55) - 1))) {
		*why = "pagemap PFN is 0 (needs CAP_SYS_ADMIN)";
		return 0;
	}
	return (ent & ((1ull << 55) - 1)) * 4096ull + ((uintptr_t)vaddr & 4095);
}

struct hb_touch {
	volatile uint64_t *w;
	uint64_t n, seed, mismatches, first_bad;
	uint64_t first[4];
};

static void hb_write_read(struct hb_touch *t)
{
	uint64_t i;

	g_phase = "host-blob write";
	for (i = 0; i < t->n; i++)
		t->w[i] = vmlab_splitmix64(t->seed + i);
	__sync_synchronize();
	g_phase = "host-blob readback";
	t->mismatches = 0;
	t->first_bad = UINT64_MAX;
	for (i = 0; i < t->n; i++) {
		uint64_t v = t->w[i];

		if (i < 4)
			t->first[i] = v;
		if (v != vmlab_splitmix64(t->seed + i)) {
			if (!t->mismatches)
				t->first_bad = i;
			t->mismatches++;
		}
	}
}

static int gpu_host_blob(int argc, char **argv)
{
	struct gopts o;
	struct params p;
	struct drm_virtgpu_context_set_param cp;
	struct drm_virtgpu_context_init ci;
	struct drm_virtgpu_resource_create_blob cb;
	struct drm_virtgpu_map mp;
	struct linelist before, after, hvmm;
	struct hb_touch t;
	uint32_t cmd[VIRGL_PIPE_RES_CREATE_SIZE + 1];
	unsigned int mask;
	char name[64], ver[64];
	const char *why = NULL, *memtype = NULL, *pat_line = NULL;
	int fd, pat_err, n, i, hv_err;
	uint64_t size, capset, phys;
	size_t j;
	void *map;

	gparse(argc, argv, "--card --size --seed --blob-id --capset --virgl-flags --hold", &o);
	if (!o.have_seed)
		o.seed = 1;
	if (!o.size || o.size > (1ull << 32) - 4096)
		gusage("--size must be 1..4294963200 bytes");
	if (!o.blob_id)
		gusage("--blob-id must be non-zero");
	size = (o.size + 4095) & ~4095ull;

	fd = open_card(o.card);
	check_driver(fd, o.card, name, sizeof(name), ver, sizeof(ver));
	get_all_params(fd, &p);
	mask = (unsigned int)param_of(&p, VIRTGPU_PARAM_SUPPORTED_CAPSET_IDs);
	if (!param_of(&p, VIRTGPU_PARAM_CONTEXT_INIT))
		gdie("%s: VIRTGPU_PARAM_CONTEXT_INIT is 0 (no context init support)", o.card);
	if (!param_of(&p, VIRTGPU_PARAM_RESOURCE_BLOB))
		gdie("%s: VIRTGPU_PARAM_RESOURCE_BLOB is 0 (device without blob=true?)", o.card);
	if (!param_of(&p, VIRTGPU_PARAM_HOST_VISIBLE))
		gdie("%s: VIRTGPU_PARAM_HOST_VISIBLE is 0 (device without hostmem=?)", o.card);
	if (o.have_capset)
		capset = o.capset;
	else if (mask & (1u << 2))
		capset = 2;
	else if (mask & (1u << 1))
		capset = 1;
	else
		gdie("%s: neither capset 1 (VIRGL) nor 2 (VIRGL2) is supported (capset mask 0x%x)",
		     o.card, mask);

	memset(&cp, 0, sizeof(cp));
	cp.param = VIRTGPU_CONTEXT_PARAM_CAPSET_ID;
	cp.value = capset;
	memset(&ci, 0, sizeof(ci));
	ci.num_params = 1;
	ci.ctx_set_params = (uint64_t)(uintptr_t)&cp;
	if (xioctl(fd, DRM_IOCTL_VIRTGPU_CONTEXT_INIT, &ci))
		die_ioctl("DRM_IOCTL_VIRTGPU_CONTEXT_INIT");

	/* one VIRGL_CCMD_PIPE_RESOURCE_CREATE: a PIPE_BUFFER of size bytes, keyed by blob_id */
	memset(cmd, 0, sizeof(cmd));
	cmd[0] = VIRGL_CMD0(VIRGL_CCMD_PIPE_RESOURCE_CREATE, 0, VIRGL_PIPE_RES_CREATE_SIZE);
	cmd[VIRGL_PIPE_RES_CREATE_TARGET] = VIRGL_PIPE_BUFFER;
	cmd[VIRGL_PIPE_RES_CREATE_FORMAT] = VIRGL_FORMAT_R8_UNORM;
	cmd[VIRGL_PIPE_RES_CREATE_BIND] = VIRGL_BIND_VERTEX_BUFFER;
	cmd[VIRGL_PIPE_RES_CREATE_WIDTH] = (uint32_t)size;
	cmd[VIRGL_PIPE_RES_CREATE_HEIGHT] = 1;
	cmd[VIRGL_PIPE_RES_CREATE_DEPTH] = 1;
	cmd[VIRGL_PIPE_RES_CREATE_ARRAY_SIZE] = 1;
	cmd[VIRGL_PIPE_RES_CREATE_LAST_LEVEL] = 0;
	cmd[VIRGL_PIPE_RES_CREATE_NR_SAMPLES] = 0;
	cmd[VIRGL_PIPE_RES_CREATE_FLAGS] = (uint32_t)o.virgl_flags;
	cmd[VIRGL_PIPE_RES_CREATE_BLOB_ID] = (uint32_t)o.blob_id;

	memset(&cb, 0, sizeof(cb));
	cb.blob_mem = VIRTGPU_BLOB_MEM_HOST3D;
	cb.blob_flags = VIRTGPU_BLOB_FLAG_USE_MAPPABLE;
	cb.size = size;
	cb.blob_id = o.blob_id;
	cb.cmd = (uint64_t)(uintptr_t)cmd;
	cb.cmd_size = sizeof(cmd);
	if (xioctl(fd, DRM_IOCTL_VIRTGPU_RESOURCE_CREATE_BLOB, &cb))
		die_ioctl("DRM_IOCTL_VIRTGPU_RESOURCE_CREATE_BLOB");
	memset(&mp, 0, sizeof(mp));
	mp.handle = cb.bo_handle;
	if (xioctl(fd, DRM_IOCTL_VIRTGPU_MAP, &mp))
		die_ioctl("DRM_IOCTL_VIRTGPU_MAP");

	gpu_ensure_debugfs();
	pat_err = read_lines(GPU_PAT_LIST, &before);
	map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)mp.offset);
	if (map == MAP_FAILED)
		gdie("mmap %s at offset 0x%" PRIx64 " (%" PRIu64 " bytes): %s", o.card,
		     (uint64_t)mp.offset, size, strerror(errno));
	gpu_install_fault();
	memset(&t, 0, sizeof(t));
	t.w = map;
	t.n = size / 8;
	t.seed = o.seed;
	hb_write_read(&t);
	phys = virt_to_phys(map, &why);
	if (!pat_err)
		pat_err = read_lines(GPU_PAT_LIST, &after);
	else
		memset(&after, 0, sizeof(after));
	if (!pat_err && phys)
		memtype = pat_lookup(&after, phys, &pat_line);
	hv_err = read_lines(GPU_HOST_VISIBLE_MM, &hvmm);

	printf("{\"ok\": %s, \"card\": ", t.mismatches ? "false" : "true");
	jstr(o.card);
	printf(", \"capset\": %" PRIu64 ", \"capsets\": ", capset);
	print_capsets(mask);
	printf(", \"ctx\": true, \"res_handle\": %u, \"bo_handle\": %u, \"size\": %" PRIu64
	       ", \"blob_id\": %" PRIu64 ", \"virgl_flags\": %" PRIu64 ", \"map_offset\": \"0x%"
	       PRIx64 "\"", cb.res_handle, cb.bo_handle, size, o.blob_id, o.virgl_flags,
	       (uint64_t)mp.offset);
	printf(", \"map_info\": null, \"map_info_source\": \"not exposed by the guest uapi; "
	       "inferred from the PAT memtype of the mapping\"");
	if (phys)
		printf(", \"phys\": \"0x%" PRIx64 "\", \"phys_error\": null", phys);
	else {
		printf(", \"phys\": null, \"phys_error\": ");
		jstr(why);
	}
	printf(", \"memtype\": ");
	jstr(memtype);
	printf(", \"pat_line\": ");
	jstr(pat_line);
	n = memtype_to_map_info(memtype);
	if (n)
		printf(", \"map_info_inferred\": %d", n);
	else
		printf(", \"map_info_inferred\": null");
	printf(", \"pat_error\": ");
	jstr(pat_err ? strerror(pat_err) : NULL);
	printf(", \"pat_new_lines\": [");
	n = 0;
	if (!pat_err)
		for (j = 0; j < after.n; j++)
			if (!ll_has(&before, after.v[j])) {
				printf("%s", n++ ? ", " : "");
				jstr(after.v[j]);
			}
	printf("], \"host_visible_mm\": ");
	if (hv_err) {
		printf("null");
	} else {
		printf("[");
		for (j = 0; j < hvmm.n && j < 64; j++) {
			printf("%s", j ? ", " : "");
			jstr(hvmm.v[j]);
		}
		printf("]");
	}
	printf(", \"readback_ok\": %s, \"mismatches\": %" PRIu64 ", \"first_mismatch\": ",
	       t.mismatches ? "false" : "true", t.mismatches);
	if (t.mismatches)
		printf("%" PRIu64, t.first_bad);
	else
		printf("null");
	printf(", \"seed\": %" PRIu64 ", \"first_words\": [", o.seed);
	for (i = 0; i < 4 && (uint64_t)i < t.n; i++)
		printf("%s\"0x%016" PRIx64 "\"", i ? ", " : "", t.first[i]);
	printf("]}\n");
	fflush(stdout);
	/* Keep the blob alive (mapped, context open) while the controller looks for the
	 * bytes on the host side: closing the fd destroys the host resource. */
	sleep_secs(o.hold);
	ll_free(&before);
	ll_free(&after);
	ll_free(&hvmm);
	munmap(map, size);
	close(fd);
	if (t.mismatches)
		gdie("readback: %" PRIu64 " of %" PRIu64 " words differ (first at word %" PRIu64 ")",
		     t.mismatches, t.n, t.first_bad);
	return 0;
}

/* ------------------------------------------------------------------ */

int gpu_main(int argc, char **argv)
{
	static const struct {
		const char *name;
		int (*fn)(int, char **);
	} subs[] = {
		{ "probe", gpu_probe },
		{ "blob-scanout", gpu_blob_scanout },
		{ "host-blob", gpu_host_blob },
	};
	size_t i;

	if (argc < 2)
		gusage("missing subcommand (probe, blob-scanout, host-blob)");
	for (i = 0; i < sizeof(subs) / sizeof(subs[0]); i++)
		if (!strcmp(argv[1], subs[i].name)) {
			g_sub = subs[i].name;
			return subs[i].fn(argc, argv);
		}
	gusage("unknown gpu subcommand '%s'", argv[1]);
}

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vmlab-guest-agent "gpu" commands (virtio-gpu via the DRM uapi, no libdrm):
 * see gpu.c for the commands and their JSON.
 */
#ifndef VMLAB_AGENT_GPU_H
#define VMLAB_AGENT_GPU_H

/* argv[0] is "gpu"; returns the process exit status (errors exit directly). */
int gpu_main(int argc, char **argv);

#endif

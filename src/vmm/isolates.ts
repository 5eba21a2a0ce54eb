/**
 * What each V8 isolate of a VMM process may keep: the main thread's, and one per worker thread
 * (the device thread, each vCPU thread, each disk's I/O thread). Every isolate has its own heap,
 * so whatever one keeps is paid once per thread and once per VM (issue 19, docs/benchmarks.md
 * "Density").
 *
 * The young generation. V8 starts each isolate's semi-spaces at 1 MiB and doubles them, up to
 * 16 MiB on a 64-bit host, while many objects survive scavenges, as they do while a VMM starts
 * (modules compiled, the kernel loaded, devices set up). The worker threads never return to
 * their event loop (each blocks in KVM_RUN, poll(2) or Atomics.wait), so V8's memory reducer,
 * which runs as a task on that loop, never shrinks the space back: measured on a project machine,
 * the grown new spaces held 4 MiB (main, device thread) and 2.8 MiB (vCPU, I/O thread) for the
 * VMM's whole life. Capped at V8's starting size, they stay at 2 MiB. Once running, the
 * threads' loops allocate little per exit or request (bench/disk's CPU split shows no GC time
 * to speak of), so a small young generation costs scavenges only while the VMM starts.
 */

/**
 * The semi-space size (MiB) every isolate of a VMM keeps to: V8's own starting size, never grown.
 * The young generation holds two semi-spaces and a new large-object space of the same size
 * (V8's Heap::YoungGenerationSizeFromSemiSpaceSize), hence the 3 below.
 */
export const VMM_SEMI_SPACE_MB = 1;

/** resourceLimits of every worker thread of a VMM (worker_threads `new Worker` options). */
export const VMM_WORKER_LIMITS = { maxYoungGenerationSizeMb: 3 * VMM_SEMI_SPACE_MB } as const;

/**
 * Node options for a VMM process, before the script: the same limit for the main thread's
 * isolate, which V8 sizes from its flags when the process starts (a worker's comes from
 * VMM_WORKER_LIMITS). Whoever spawns a VMM (the daemon's engine, the benchmarks) passes them.
 */
export const VMM_NODE_FLAGS: readonly string[] = [`--max-semi-space-size=${VMM_SEMI_SPACE_MB}`];

// Can a dispatch whose bulk data crosses NVLink by the copy engine finish near the CE's ceiling
// (~157 us for 58.7 MB each way, BENCHMARKS.md)? Two GPUs of one process each send 4096 rows to
// the other at once: the copy stream cudaMemcpyAsync's K chunks into the peer's region, each
// followed by an 8-byte copy of the iteration stamp into the peer's flag for that chunk (stream
// order puts the flag after the data: how NCCL's copy-engine collectives signal), while a receive
// kernel of Q blocks on the main stream copies the rank's own rows x -> out[0, kRows), then each
// chunk region -> out[kRows, 2 kRows) as its flag lands. Chunks go to blocks two ways:
//   dealt  : chunk k to block k mod Q, which copies all its rows (the brief's scheme)
//   spread : rows in groups of 16 (one per warp) round-robin to blocks; a block waits on the
//            chunk holding its next group, so every chunk is copied by C/16 blocks at once
// Rows: BF16 hidden 7168 (14336 B) and FP8 7168 + 224 scale bytes (7392 B). Not part of the build:
// nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -o /tmp/ce_probe
// scripts/ce_dispatch_probe.cu && /tmp/ce_probe (needs 2 GPUs with peer access).
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>

#include "../csrc/cuda/nvl_rows.cuh"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

constexpr int kRows = 4096;
constexpr int64_t kMaxRowBytes = 14336;
constexpr int kMaxChunks = 32;
constexpr int kWarps = 16;  // 512-thread blocks
constexpr int kMaxIter = 64;

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Spins until *p >= want; after 5 s says what it waited for and traps, so a bug never hangs.
__device__ void wait_geq(const uint64_t* p, uint64_t want, const char* what, int k) {
  uint64_t t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  while (ld_acquire_sys(p) < want) {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 > 5000000000ull) {
      printf("timeout: block %d waits on %s %d for %llu, has %llu\n", blockIdx.x, what, k,
             (unsigned long long)want, (unsigned long long)ld_acquire_sys(p));
      __trap();
    }
  }
}

// Holds the main stream until the host has enqueued both sides: enqueuing 2K + 2 memcpys takes the
// host longer than the transfer, so without it the host, not the link, would pace the copies.
__global__ void gate_kernel(const uint64_t* gate, uint64_t open) { wait_geq(gate, open, "gate", 0); }

__global__ void __launch_bounds__(512, 1)
receive_kernel(const uint8_t* x, const uint8_t* region, uint8_t* out, const uint64_t* flags, int64_t rb,
               int K, uint64_t it, bool spread) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Own rows first: they need no one, so they run while the first chunks cross the link.
  for (int r = blockIdx.x * kWarps + warp; r < kRows; r += gridDim.x * kWarps) {
    ep_ops::cuda::warp_copy(out + r * rb, x + r * rb, rb, lane);
  }
  const int C = kRows / K;  // rows per chunk, a multiple of kWarps (host checks)
  // Region rows are read through L2 only: the peer's CE wrote them during this kernel.
  if (!spread) {
    for (int k = blockIdx.x; k < K; k += gridDim.x) {
      if (threadIdx.x == 0) wait_geq(flags + k, it, "chunk", k);
      __syncthreads();  // thread 0's acquire, then the barrier, orders the block's loads after it
      for (int t = k * C + warp; t < (k + 1) * C; t += kWarps) {
        ep_ops::cuda::warp_copy<false, true>(out + (kRows + t) * rb, region + t * rb, rb, lane);
      }
    }
  } else {
    int waited = -1;  // a group never straddles chunks (C % kWarps == 0), and k only grows
    for (int base = blockIdx.x * kWarps; base < kRows; base += gridDim.x * kWarps) {
      const int k = base / C;
      if (k != waited) {
        if (threadIdx.x == 0) wait_geq(flags + k, it, "chunk", k);
        __syncthreads();
        waited = k;
      }
      const int t = base + warp;
      ep_ops::cuda::warp_copy<false, true>(out + (kRows + t) * rb, region + t * rb, rb, lane);
    }
  }
}

struct Side {
  int dev;
  uint8_t *x, *region, *out;  // region: written by the peer's copies; out: [own rows | peer rows]
  uint64_t *flags, *stamp;    // flags: a chunk each, written by the peer; stamp: this rep's number
  cudaStream_t main, copy;
  cudaEvent_t start, stop, join;
};

static uint64_t* g_gate;     // pinned, mapped: the host opens it once both sides are enqueued
static uint64_t g_gate_count = 0;
static uint64_t* g_stamps;   // pinned: g_stamps[j] = j, the stamp's source (a CE copy, no SM)

// Median over reps of the worse side, each rep started with both devices idle and behind one gate;
// `launch(me, peer, it)` enqueues side me's rep `it` (from 1) between its start and stop events.
template <typename Launch>
float run_both(Side* sides, Launch launch, int reps = 10) {
  std::vector<float> times;
  for (int it = 1; it <= reps + 2; ++it) {
    for (int i = 0; i < 2; ++i) { CK(cudaSetDevice(sides[i].dev)); CK(cudaDeviceSynchronize()); }
    const uint64_t open = ++g_gate_count;
    for (int i = 0; i < 2; ++i) {
      CK(cudaSetDevice(sides[i].dev));
      gate_kernel<<<1, 1, 0, sides[i].main>>>(g_gate, open);
      CK(cudaEventRecord(sides[i].start, sides[i].main));
      launch(sides[i], sides[1 - i], it);
      CK(cudaGetLastError());
      CK(cudaEventRecord(sides[i].stop, sides[i].main));
    }
    __atomic_store_n(g_gate, open, __ATOMIC_RELEASE);
    float worst = 0;
    for (int i = 0; i < 2; ++i) {
      CK(cudaSetDevice(sides[i].dev));
      CK(cudaEventSynchronize(sides[i].stop));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, sides[i].start, sides[i].stop));
      worst = std::max(worst, ms);
    }
    if (it > 2) times.push_back(worst * 1000.f);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Word j of row r of GPU d's x: unique over (d, r, j), so a misplaced row or chunk shows.
static uint32_t word(int d, int r, int j) { return (uint32_t(d) << 28) | (uint32_t(r) << 12) | uint32_t(j); }

static void fill(Side* sides, int64_t rb) {
  std::vector<uint32_t> h(kRows * rb / 4);
  for (int i = 0; i < 2; ++i) {
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < rb / 4; ++j) h[r * rb / 4 + j] = word(i, r, j);
    CK(cudaSetDevice(i));
    CK(cudaMemcpy(sides[i].x, h.data(), kRows * rb, cudaMemcpyHostToDevice));
  }
}

// Bad bytes on GPU i: region must hold the peer's x; with a receive, out must hold [own x | peer x].
static size_t check(Side* sides, int i, int64_t rb, bool receive) {
  std::vector<uint32_t> h(2 * kRows * rb / 4);
  size_t bad = 0;
  auto cmp = [&](int64_t at, int d, int r) {
    for (int j = 0; j < rb / 4; ++j)
      for (uint32_t e = h[at + j] ^ word(d, r, j); e; e >>= 8) bad += (e & 0xff) != 0;
  };
  CK(cudaSetDevice(i));
  CK(cudaMemcpy(h.data(), sides[i].region, kRows * rb, cudaMemcpyDeviceToHost));
  for (int r = 0; r < kRows; ++r) cmp(r * rb / 4, 1 - i, r);
  if (receive) {
    CK(cudaMemcpy(h.data(), sides[i].out, 2 * kRows * rb, cudaMemcpyDeviceToHost));
    for (int r = 0; r < 2 * kRows; ++r) cmp(r * rb / 4, r < kRows ? i : 1 - i, r % kRows);
  }
  return bad;
}

struct Variant { const char* name; int K, Q; bool flags, spread; };

// One dispatch on side me (after run_both's start event on the main stream).
static void dispatch(Side& me, Side& peer, const Variant& v, int64_t rb, uint64_t it) {
  const int64_t C = kRows / v.K;
  CK(cudaStreamWaitEvent(me.copy, me.start, 0));
  if (v.flags) CK(cudaMemcpyAsync(me.stamp, g_stamps + it, 8, cudaMemcpyHostToDevice, me.copy));
  for (int k = 0; k < v.K; ++k) {
    CK(cudaMemcpyAsync(peer.region + k * C * rb, me.x + k * C * rb, C * rb, cudaMemcpyDeviceToDevice, me.copy));
    if (v.flags) CK(cudaMemcpyAsync(peer.flags + k, me.stamp, 8, cudaMemcpyDeviceToDevice, me.copy));
  }
  CK(cudaEventRecord(me.join, me.copy));
  // The receive waits only on the peer's copy stream, which waits only on the peer's start event:
  // nothing behind it on this stream, and no wait needs another of its blocks resident.
  if (v.Q > 0) receive_kernel<<<v.Q, 32 * kWarps, 0, me.main>>>(me.x, me.region, me.out, me.flags, rb, v.K, it, v.spread);
  CK(cudaStreamWaitEvent(me.main, me.join, 0));
}

int main() {
  Side sides[2];
  int sms = 0;
  CK(cudaHostAlloc(&g_gate, 8, cudaHostAllocMapped | cudaHostAllocPortable));
  CK(cudaHostAlloc(&g_stamps, kMaxIter * 8, cudaHostAllocPortable));
  *g_gate = 0;
  for (int j = 0; j < kMaxIter; ++j) g_stamps[j] = j;
  for (int i = 0; i < 2; ++i) {
    Side& s = sides[i];
    s.dev = i;
    CK(cudaSetDevice(i));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, i));
    CK(cudaDeviceEnablePeerAccess(1 - i, 0));
    CK(cudaMalloc(&s.x, kRows * kMaxRowBytes));
    CK(cudaMalloc(&s.region, kRows * kMaxRowBytes));
    CK(cudaMalloc(&s.out, 2 * kRows * kMaxRowBytes));
    CK(cudaMalloc(&s.flags, kMaxChunks * 8));
    CK(cudaMalloc(&s.stamp, 8));
    CK(cudaStreamCreateWithFlags(&s.main, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s.copy, cudaStreamNonBlocking));
    CK(cudaEventCreate(&s.start));
    CK(cudaEventCreate(&s.stop));
    CK(cudaEventCreateWithFlags(&s.join, cudaEventDisableTiming));
  }
  auto measure = [&](const Variant& v, int64_t rb) {
    if (kRows % v.K || (kRows / v.K) % kWarps || v.K > kMaxChunks || v.Q > sms) {
      printf("%s K %d Q %d: skipped (chunk rows not a multiple of %d, or Q over %d SMs)\n", v.name, v.K, v.Q, kWarps, sms);
      return;
    }
    // zero what the run writes, so a variant that misses rows cannot pass on an earlier one's;
    // flags 0 and stamps from 1: a stale flag never satisfies a wait
    for (int i = 0; i < 2; ++i) {
      CK(cudaSetDevice(i));
      CK(cudaMemset(sides[i].region, 0, kRows * kMaxRowBytes));
      CK(cudaMemset(sides[i].out, 0, 2 * kRows * kMaxRowBytes));
      CK(cudaMemset(sides[i].flags, 0, kMaxChunks * 8));
      CK(cudaDeviceSynchronize());
    }
    const float us = run_both(sides, [&](Side& me, Side& peer, int it) { dispatch(me, peer, v, rb, it); });
    const size_t bad0 = check(sides, 0, rb, v.Q > 0), bad1 = check(sides, 1, rb, v.Q > 0);
    const double mb = kRows * rb / 1e6;
    printf("%-30s row %5lld K %3d Q %4d  %8.1f us  %6.1f GB/s each way  bad %zu %zu\n", v.name, (long long)rb,
           v.K, v.Q, us, mb / us * 1e3, bad0, bad1);
    fflush(stdout);
  };
  for (int64_t rb : {int64_t{14336}, int64_t{7168 + 224}}) {
    const bool bf16 = rb == 14336;
    fill(sides, rb);
    measure({"ce one memcpy, no receive", 1, 0, false, false}, rb);
    for (int K : {8, 32}) measure({"ce chunks+flags, no receive", K, 0, true, false}, rb);
    for (int spread = 0; spread < 2; ++spread) {
      const char* name = spread ? "ce + receive spread" : "ce + receive dealt";
      for (int K : bf16 ? std::vector<int>{1, 4, 8, 16, 32} : std::vector<int>{4, 8, 16}) {
        measure({name, K, 100, true, spread == 1}, rb);
      }
      if (!bf16) continue;
      for (int K : {8, 16}) {
        for (int Q : {32, 64, 132}) measure({name, K, Q, true, spread == 1}, rb);
      }
    }
  }
  return 0;
}

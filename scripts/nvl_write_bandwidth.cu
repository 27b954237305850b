// NVLink write bandwidth between the two GPUs of one process, both directions at once, moving
// 4096 rows x 14336 B (the reference dispatch's rows to the peer, HARDWARE.md): what the link
// gives SM stores, bulk (TMA) copies and the copy engine, with and without a fence + flag per row
// (what the dispatch's per-row progress signal costs), by grid size. Variants:
//   st   : a warp per row, 16-B loads/stores (ep_ops' warp_copy), optional fence+flag per row
//   tma  : lane 0 of each warp: bulk load of a row chunk -> smem, bulk store smem -> peer
//   pull : a warp per row, 16-B loads from the peer, stores local
//   ce   : cudaMemcpyPeerAsync of all bytes
//   flags: (`/tmp/nvl_bw flags`, alone) who releases a progress flag and how often, for BF16 and
//          FP8 row sizes (flag_kernel below)
//   align: (`/tmp/nvl_bw align`, alone) the same rows written at a destination stride that is not
//          a multiple of 128 B (a dispatch row's +16 for its source index) or is one
// Not part of the build: nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -o /tmp/nvl_bw
// scripts/nvl_write_bandwidth.cu && /tmp/nvl_bw [flags] (needs 2 GPUs with peer access; results
// in BENCHMARKS.md, sessions 7 and 18).
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <string>
#include <cuda_runtime.h>

#include "../csrc/cuda/nvl_rows.cuh"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

constexpr int kRows = 4096;
constexpr int64_t kRowBytes = 14336;

__device__ __forceinline__ void signal(uint64_t* flag, bool on, int lane) {
  __syncwarp();
  if (on && lane == 0) {
    asm volatile("fence.acq_rel.sys;" ::: "memory");
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(flag), "l"(1ull) : "memory");
  }
}

// The copies are ep_ops' own (csrc/cuda/nvl_rows.cuh): loads through the read-only cache for
// the local source, through L2 only for the peer's.
__global__ void __launch_bounds__(512) st_kernel(const uint8_t* src, uint8_t* dst, uint64_t* flags, bool fence) {
  const int lane = threadIdx.x % 32, wpb = blockDim.x / 32;
  for (int r = blockIdx.x * wpb + threadIdx.x / 32; r < kRows; r += gridDim.x * wpb) {
    ep_ops::cuda::warp_copy(dst + r * kRowBytes, src + r * kRowBytes, kRowBytes, lane);
    signal(flags + r, fence, lane);
  }
}

// How often a send releases a progress flag, and who issues the release (`nvl_bw flags`): rows of
// `row_bytes` (14336 BF16, 7392 FP8), a warp per row, 14 int4 loads per lane in flight (the
// dispatch's stage). Modes: 0 no flag; 1 each warp releases a flag after each row (what the
// overlapped dispatch does: red.release.sys, no fence); 2 each warp releases once per two rows;
// 3 per wave of the block's rows: a block barrier, then warp 0 releases the wave's flags in one
// instruction (a lane per row) while the other warps go on.
// dst_stride: the rows' stride at the destination (row_bytes: packed; `align` mode varies it).
template <int kMode>
__global__ void __launch_bounds__(512) flag_kernel(const uint8_t* src, uint8_t* dst, uint64_t* flags,
                                                   int64_t row_bytes, int64_t dst_stride) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wpb = blockDim.x / 32;
  const int stride = gridDim.x * wpb, waves = (kRows + stride - 1) / stride;
  for (int k = 0; k < waves; ++k) {
    const int r = k * stride + blockIdx.x * wpb + warp;
    if (r < kRows) {
      ep_ops::cuda::warp_copy<true, false, 14>(dst + r * dst_stride, src + r * row_bytes, row_bytes, lane);
    }
    if (kMode == 1 || (kMode == 2 && (k % 2 == 1 || k == waves - 1))) {
      __syncwarp();
      const int first = kMode == 1 ? r : r - (k % 2) * stride;
      const int row = first + lane * stride;
      if (lane <= (kMode == 1 ? 0 : k % 2) && row < kRows) {
        asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(flags + row), "l"(1ull) : "memory");
      }
    }
    if (kMode == 3) {
      __syncthreads();
      const int row = k * stride + blockIdx.x * wpb + lane;
      if (warp == 0 && lane < wpb && row < kRows) {
        asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(flags + row), "l"(1ull) : "memory");
      }
    }
  }
}

__global__ void __launch_bounds__(512) pull_kernel(const uint8_t* src_remote, uint8_t* dst) {
  const int lane = threadIdx.x % 32, wpb = blockDim.x / 32;
  for (int r = blockIdx.x * wpb + threadIdx.x / 32; r < kRows; r += gridDim.x * wpb) {
    ep_ops::cuda::warp_copy</*kReadOnly=*/false, /*kSkipL1=*/true>(dst + r * kRowBytes, src_remote + r * kRowBytes,
                                                                  kRowBytes, lane);
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// kChunk bytes per stage, kStages stages per warp; lane 0 drives the pipeline.
template <int kChunk, int kStages>
__global__ void tma_kernel(const uint8_t* src, uint8_t* dst, uint64_t* flags, bool fence) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t bars[32][kStages];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wpb = blockDim.x / 32;
  uint8_t* buf = smem + warp * kStages * kChunk;
  if (lane == 0) {
    for (int s = 0; s < kStages; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&bars[warp][s])));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncwarp();
  uint32_t phase[kStages] = {};
  int k = 0;  // chunks issued by this warp so far
  constexpr int kChunks = kRowBytes / kChunk;
  for (int r = blockIdx.x * wpb + warp; r < kRows; r += gridDim.x * wpb) {
    if (lane == 0) {
      for (int c = 0; c < kChunks; ++c, ++k) {
        const int s = k % kStages;
        // the stage's previous store must have read smem
        asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kStages - 1) : "memory");
        const uint32_t bar = smem_addr(&bars[warp][s]);
        const uint32_t sm = smem_addr(buf + s * kChunk);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(kChunk) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(sm), "l"(src + r * kRowBytes + c * kChunk), "r"(kChunk), "r"(bar) : "memory");
        uint32_t done = 0;
        while (!done) {
          asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                       : "=r"(done) : "r"(bar), "r"(phase[s]) : "memory");
        }
        phase[s] ^= 1;
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                     ::"l"(dst + r * kRowBytes + c * kChunk), "r"(sm), "r"(kChunk) : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
      if (fence) {
        asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
        asm volatile("fence.proxy.async.global;" ::: "memory");
        asm volatile("fence.acq_rel.sys;" ::: "memory");
        asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(flags + r), "l"(1ull) : "memory");
      }
    }
    __syncwarp();
  }
  if (lane == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

struct Side {
  int dev;
  uint8_t *src, *dst, *flags_mem;  // dst: on this device, written by the peer
  cudaStream_t stream;
  cudaEvent_t start, stop;
};

template <typename Launch>
float run_both(Side* sides, Launch launch, int reps = 10) {
  std::vector<float> times;
  for (int it = 0; it < reps + 2; ++it) {
    for (int i = 0; i < 2; ++i) { CK(cudaSetDevice(sides[i].dev)); CK(cudaDeviceSynchronize()); }
    for (int i = 0; i < 2; ++i) {
      CK(cudaSetDevice(sides[i].dev));
      CK(cudaEventRecord(sides[i].start, sides[i].stream));
      launch(sides[i], sides[1 - i]);
      CK(cudaGetLastError());
      CK(cudaEventRecord(sides[i].stop, sides[i].stream));
    }
    float worst = 0;
    for (int i = 0; i < 2; ++i) {
      CK(cudaSetDevice(sides[i].dev));
      CK(cudaEventSynchronize(sides[i].stop));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, sides[i].start, sides[i].stop));
      worst = std::max(worst, ms);
    }
    if (it >= 2) times.push_back(worst * 1000.f);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

int main(int argc, char** argv) {
  const bool flags_only = argc > 1 && std::string(argv[1]) == "flags";
  const bool align_only = argc > 1 && std::string(argv[1]) == "align";
  Side sides[2];
  const size_t bytes = kRows * kRowBytes;
  const size_t alloc_bytes = kRows * (kRowBytes + 256);  // room for the `align` mode's widest stride
  for (int i = 0; i < 2; ++i) {
    sides[i].dev = i;
    CK(cudaSetDevice(i));
    CK(cudaDeviceEnablePeerAccess(1 - i, 0));
    CK(cudaMalloc(&sides[i].src, alloc_bytes));
    CK(cudaMalloc(&sides[i].dst, alloc_bytes));
    CK(cudaMalloc(&sides[i].flags_mem, kRows * 8));
    CK(cudaMemset(sides[i].src, i + 1, bytes));
    CK(cudaMemset(sides[i].flags_mem, 0, kRows * 8));
    CK(cudaStreamCreateWithFlags(&sides[i].stream, cudaStreamNonBlocking));
    CK(cudaEventCreate(&sides[i].start));
    CK(cudaEventCreate(&sides[i].stop));
  }
  const double mb = bytes / 1e6;
  auto report = [&](const char* name, int blocks, float us) {
    printf("%-28s blocks %4d  %8.1f us  %6.1f GB/s each way\n", name, blocks, us, mb / us * 1e3);
    fflush(stdout);
  };
  if (flags_only) {
    const char* names[] = {"no flag", "release per row (warp)", "release per 2 rows (warp)",
                           "release per wave (block)"};
    for (int64_t row_bytes : {int64_t{14336}, int64_t{7392}}) {
      const double row_mb = kRows * row_bytes / 1e6;
      for (int b : {32, 64, 132}) {
        for (int mode = 0; mode < 4; ++mode) {
          const auto kernel = mode == 0 ? flag_kernel<0> : mode == 1 ? flag_kernel<1> : mode == 2 ? flag_kernel<2>
                                                                                                  : flag_kernel<3>;
          const float us = run_both(sides, [&](Side& me, Side& peer) {
            kernel<<<b, 512, 0, me.stream>>>(me.src, peer.dst, reinterpret_cast<uint64_t*>(peer.flags_mem),
                                             row_bytes, row_bytes);
          });
          printf("row %5lld B  blocks %4d  %-28s %8.1f us  %6.1f GB/s each way\n",
                 static_cast<long long>(row_bytes), b, names[mode], us, row_mb / us * 1e3);
          fflush(stdout);
        }
      }
    }
    return 0;
  }
  if (align_only) {
    // The same rows written at the destination with a stride of the row's bytes, + 16 (a dispatch
    // row: payload, then a 16-byte slot for the source index) and rounded up to 128 B (a line).
    for (int64_t row_bytes : {int64_t{14336}, int64_t{7392}}) {
      const double row_mb = kRows * row_bytes / 1e6;
      for (int64_t stride : {row_bytes, row_bytes + 16, (row_bytes + 16 + 127) / 128 * 128}) {
        for (int mode : {0, 1}) {
          const float us = run_both(sides, [&](Side& me, Side& peer) {
            (mode == 0 ? flag_kernel<0> : flag_kernel<1>)<<<64, 512, 0, me.stream>>>(
                me.src, peer.dst, reinterpret_cast<uint64_t*>(peer.flags_mem), row_bytes, stride);
          });
          printf("row %5lld B  dst stride %5lld (mod 128: %3lld)  %-24s %8.1f us  %6.1f GB/s each way\n",
                 static_cast<long long>(row_bytes), static_cast<long long>(stride),
                 static_cast<long long>(stride % 128), mode ? "release per row" : "no flag", us,
                 row_mb / us * 1e3);
          fflush(stdout);
        }
      }
    }
    return 0;
  }
  report("ce memcpy peer", 0, run_both(sides, [&](Side& me, Side& peer) {
    CK(cudaMemcpyPeerAsync(peer.dst, peer.dev, me.src, me.dev, bytes, me.stream));
  }));
  const int grid[] = {8, 16, 24, 32, 48, 64, 96, 132, 264};
  for (int fence = 0; fence < 2; ++fence) {
    for (int b : grid) {
      report(fence ? "st u4 512t fence/row" : "st u4 512t", b, run_both(sides, [&](Side& me, Side& peer) {
        st_kernel<<<b, 512, 0, me.stream>>>(me.src, peer.dst, reinterpret_cast<uint64_t*>(peer.flags_mem), fence);
      }));
    }
  }
  for (int b : {16, 32, 64, 132}) {
    report("st u4 256t fence/row", b, run_both(sides, [&](Side& me, Side& peer) {
      st_kernel<<<b, 256, 0, me.stream>>>(me.src, peer.dst, reinterpret_cast<uint64_t*>(peer.flags_mem), true);
    }));
  }
  for (int b : grid) {
    report("pull u4 512t", b, run_both(sides, [&](Side& me, Side& peer) {
      pull_kernel<<<b, 512, 0, me.stream>>>(peer.src, me.dst);
    }));
  }
  // tma: 8 warps x 2 stages x 7168 B = 112 KB
  constexpr int kChunk = 7168, kStages = 2, kWarps = 8;
  const int smem = kWarps * kStages * kChunk;
  for (int i = 0; i < 2; ++i) {
    CK(cudaSetDevice(i));
    CK(cudaFuncSetAttribute(tma_kernel<kChunk, kStages>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CK(cudaFuncSetAttribute(tma_kernel<3584, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CK(cudaFuncSetAttribute(tma_kernel<14336, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  for (int fence = 0; fence < 2; ++fence) {
    for (int b : grid) {
      report(fence ? "tma 7168x2 8w fence/row" : "tma 7168x2 8w", b, run_both(sides, [&](Side& me, Side& peer) {
        tma_kernel<kChunk, kStages><<<b, kWarps * 32, smem, me.stream>>>(me.src, peer.dst,
                                                                       reinterpret_cast<uint64_t*>(peer.flags_mem), fence);
      }));
    }
  }
  for (int b : {16, 32, 64, 132}) {
    report("tma 3584x4 8w fence/row", b, run_both(sides, [&](Side& me, Side& peer) {
      tma_kernel<3584, 4><<<b, kWarps * 32, smem, me.stream>>>(me.src, peer.dst,
                                                               reinterpret_cast<uint64_t*>(peer.flags_mem), true);
    }));
    report("tma 14336x1 8w fence/row", b, run_both(sides, [&](Side& me, Side& peer) {
      tma_kernel<14336, 1><<<b, kWarps * 32, smem, me.stream>>>(me.src, peer.dst,
                                                                reinterpret_cast<uint64_t*>(peer.flags_mem), true);
    }));
  }
  // correctness of one tma run into zeroed buffers: peer.dst must hold the source bytes (i + 1)
  for (int i = 0; i < 2; ++i) { CK(cudaSetDevice(i)); CK(cudaMemset(sides[i].dst, 0, bytes)); CK(cudaDeviceSynchronize()); }
  run_both(sides, [&](Side& me, Side& peer) {
    tma_kernel<kChunk, kStages><<<32, kWarps * 32, smem, me.stream>>>(me.src, peer.dst,
                                                                    reinterpret_cast<uint64_t*>(peer.flags_mem), true);
  }, 1);
  for (int i = 0; i < 2; ++i) {
    CK(cudaSetDevice(i));
    std::vector<uint8_t> host(bytes);
    CK(cudaMemcpy(host.data(), sides[i].dst, bytes, cudaMemcpyDeviceToHost));
    size_t bad = 0;
    for (size_t j = 0; j < bytes; ++j) bad += host[j] != static_cast<uint8_t>(2 - i);
    printf("dst on GPU %d: %zu bad bytes\n", i, bad);
  }
  return 0;
}

// The collective backend's view of a c10d process group: name resolution, the all-to-all moves
// every op is built from, and the header exchange that makes input errors fail on every rank.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <functional>
#include <string>
#include <vector>

namespace ep_ops::collective {

using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

Group resolve_group(const std::string& group_name);

// Rows of `send` (dim 0) go to rank r in consecutive blocks of send_counts[r] rows; the result
// holds recv_counts[r] rows from each rank r, in rank order. Every rank must call it.
at::Tensor all_to_all_rows(const Group& group, const at::Tensor& send,
                           const std::vector<int64_t>& send_counts,
                           const std::vector<int64_t>& recv_counts);

// send[r] goes to rank r; result[r] came from rank r. Equal-sized blocks.
at::Tensor all_to_all_equal(const Group& group, const at::Tensor& send);

// What an op's local input checks concluded, kept so the error can be raised after the peers
// have been told (a rank that throws before the exchange would leave its peers waiting).
struct CheckResult {
  enum class Kind { kOk, kValue, kType, kRuntime } kind = Kind::kOk;
  std::string message;
  bool ok() const { return kind == Kind::kOk; }
};

CheckResult run_checks(const std::function<void()>& checks);

// A field every rank must agree on (hidden size, dtype, top-k, ...), with its name for errors.
struct SignatureField {
  const char* name;
  int64_t value;
};

// Exchanges one header per rank: the check status, the signature fields and a payload of
// int64 values (e.g. token counts). Raises on every rank if any rank failed its checks or the
// ranks disagree on a signature field; otherwise returns the payloads, indexed [rank][i].
// The header travels on `device` (the op's data device: NCCL moves only CUDA tensors). A peer
// that does not arrive makes this rank raise an error naming that peer, the op and the phase:
// on CPU (gloo) within the process group's timeout (at once if its connection fails); on
// device groups (NCCL) at 80% of it, before NCCL's watchdog (watched_exchange.h).
std::vector<std::vector<int64_t>> exchange_headers(const Group& group, const char* op,
                                                    const at::Device& device,
                                                    const CheckResult& local,
                                                    const std::vector<SignatureField>& signature,
                                                    const std::vector<int64_t>& payload);

// Byte view of a tensor's rows: [rows, ...] -> [rows, bytes per row] uint8 (contiguous copy if
// needed). Used to pack several fields of a row into one message.
at::Tensor byte_rows(const at::Tensor& t);

// The inverse: columns [offset, offset + count * element size) of byte rows, as [rows, count].
at::Tensor field_from_bytes(const at::Tensor& rows, int64_t offset, int64_t count,
                            at::ScalarType dtype);

}  // namespace ep_ops::collective

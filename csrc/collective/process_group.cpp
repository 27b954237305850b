#include "process_group.h"

#include "watched_exchange.h"

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <algorithm>
#include <cctype>
#include <sstream>

namespace ep_ops::collective {

Group resolve_group(const std::string& group_name) {
  try {
    return c10d::resolve_process_group(group_name);
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, "ep_ops: group_name '", group_name,
                      "' names no registered process group (pass group.group_name of a group "
                      "created with torch.distributed)");
  }
}

at::Tensor all_to_all_rows(const Group& group, const at::Tensor& send,
                           const std::vector<int64_t>& send_counts,
                           const std::vector<int64_t>& recv_counts) {
  int64_t num_recv = 0;
  for (auto c : recv_counts) num_recv += c;
  auto sizes = send.sizes().vec();
  sizes[0] = num_recv;
  auto recv = at::empty(sizes, send.options());
  auto in = send.contiguous();
  std::vector<int64_t> in_splits(send_counts), out_splits(recv_counts);
  group->alltoall_base(recv, in, out_splits, in_splits)->wait();
  return recv;
}

at::Tensor all_to_all_equal(const Group& group, const at::Tensor& send) {
  TORCH_INTERNAL_ASSERT(send.size(0) == group->getSize());
  auto recv = at::empty_like(send, at::MemoryFormat::Contiguous);
  auto in = send.contiguous();
  std::vector<int64_t> equal;
  group->alltoall_base(recv, in, equal, equal)->wait();
  return recv;
}

CheckResult run_checks(const std::function<void()>& checks) {
  using Kind = CheckResult::Kind;
  try {
    checks();
  } catch (const c10::ValueError& e) {
    return {Kind::kValue, e.what_without_backtrace()};
  } catch (const c10::TypeError& e) {
    return {Kind::kType, e.what_without_backtrace()};
  } catch (const c10::Error& e) {
    return {Kind::kRuntime, e.what_without_backtrace()};
  }
  return {};
}

namespace {

constexpr int kHeaderTag = 0x6570;  // "ep": the headers' point-to-point messages

bool mentions_timeout(const std::string& message) {
  std::string lower(message);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  return lower.find("timed out") != std::string::npos || lower.find("timeout") != std::string::npos;
}

// Waits for a header message with peer `peer`; a failure names the peer and what it means.
void wait_header(const c10::intrusive_ptr<c10d::Work>& work, const char* op, int64_t me,
                 int64_t peer, const char* direction) {
  try {
    work->wait();
  } catch (const std::exception& e) {
    const std::string cause = e.what();
    if (mentions_timeout(cause)) {
      TORCH_CHECK(false, "ep_ops.", op, ": rank ", me, " timed out in the header exchange (the ",
                  "check-in every ep_ops op starts with) waiting to ", direction, " rank ", peer,
                  ": rank ", peer, " has not called ep_ops.", op, " within the process group's ",
                  "timeout (is it late, hung, or running other calls?). Cause: ", cause);
    }
    TORCH_CHECK(false, "ep_ops.", op, ": rank ", me, " lost rank ", peer, " in the header ",
                "exchange (the check-in every ep_ops op starts with) while waiting to ", direction,
                " it: its connection failed (has rank ", peer, " died?). Cause: ", cause);
  }
}

// Every rank's header row, [R, width]. CPU groups (gloo) exchange them point to point, so that a
// peer that never arrives, or died, is named in gloo's error; device groups (NCCL, where a lost
// peer would hang until the communicator's watchdog) use one all-to-all that the host watches
// (watched_exchange.h).
at::Tensor exchange_header_rows(const Group& group, const char* op, const at::Tensor& row,
                                const at::Device& device) {
  const int64_t num_ranks = group->getSize(), me = group->getRank();
  if (!device.is_cpu() || cpu_groups_use_watched_exchange()) {
    return watched_all_to_all_rows(group, op, row, device);
  }
  auto all = at::empty({num_ranks, row.size(0)}, row.options());
  all[me].copy_(row);
  std::vector<c10::intrusive_ptr<c10d::Work>> sends(num_ranks), recvs(num_ranks);
  std::vector<std::vector<at::Tensor>> send_tensors(num_ranks), recv_tensors(num_ranks);
  for (int64_t peer = 0; peer < num_ranks; ++peer) {
    if (peer == me) continue;
    send_tensors[peer] = {row};
    recv_tensors[peer] = {all[peer]};
    sends[peer] = group->send(send_tensors[peer], static_cast<int>(peer), kHeaderTag);
    recvs[peer] = group->recv(recv_tensors[peer], static_cast<int>(peer), kHeaderTag);
  }
  for (int64_t peer = 0; peer < num_ranks; ++peer) {
    if (peer != me) wait_header(recvs[peer], op, me, peer, "hear from");
  }
  for (int64_t peer = 0; peer < num_ranks; ++peer) {
    if (peer != me) wait_header(sends[peer], op, me, peer, "send to");
  }
  return all;
}

[[noreturn]] void raise(const CheckResult& result) {
  switch (result.kind) {
    case CheckResult::Kind::kValue:
      TORCH_CHECK_VALUE(false, result.message);
    case CheckResult::Kind::kType:
      TORCH_CHECK_TYPE(false, result.message);
    default:
      TORCH_CHECK(false, result.message);
  }
}

}  // namespace

std::vector<std::vector<int64_t>> exchange_headers(const Group& group, const char* op,
                                                    const at::Device& device,
                                                    const CheckResult& local,
                                                    const std::vector<SignatureField>& signature,
                                                    const std::vector<int64_t>& payload) {
  const int64_t num_ranks = group->getSize();
  const int64_t num_sig = static_cast<int64_t>(signature.size());
  const int64_t width = 1 + num_sig + static_cast<int64_t>(payload.size());

  std::vector<int64_t> mine(width, 0);
  mine[0] = local.ok() ? 0 : 1;
  if (local.ok()) {
    for (int64_t i = 0; i < num_sig; ++i) mine[1 + i] = signature[i].value;
    std::copy(payload.begin(), payload.end(), mine.begin() + 1 + num_sig);
  }
  // The header travels on the data's device: NCCL groups move only device tensors.
  auto row = at::tensor(mine, at::TensorOptions().dtype(at::kLong));
  auto all = exchange_header_rows(group, op, row, device);
  auto acc = all.accessor<int64_t, 2>();

  if (!local.ok()) raise(local);
  for (int64_t r = 0; r < num_ranks; ++r) {
    TORCH_CHECK(acc[r][0] == 0, "ep_ops.", op, ": rank ", r,
                " rejected its input (its own error says why); this rank stops too so that "
                "no rank waits for the others");
  }
  const int64_t me = group->getRank();
  for (int64_t r = 0; r < num_ranks; ++r) {
    for (int64_t i = 0; i < num_sig; ++i) {
      TORCH_CHECK_VALUE(acc[r][1 + i] == signature[i].value, "ep_ops.", op,
                        ": ranks disagree on ", signature[i].name, ": rank ", me, " has ",
                        signature[i].value, ", rank ", r, " has ", acc[r][1 + i]);
    }
  }
  std::vector<std::vector<int64_t>> payloads(num_ranks);
  for (int64_t r = 0; r < num_ranks; ++r) {
    for (size_t i = 0; i < payload.size(); ++i) payloads[r].push_back(acc[r][1 + num_sig + i]);
  }
  return payloads;
}

at::Tensor byte_rows(const at::Tensor& t) {
  auto c = t.contiguous();
  const int64_t rows = c.size(0);
  int64_t inner = 1;
  for (int64_t d = 1; d < c.dim(); ++d) inner *= c.size(d);
  return c.reshape({rows, inner}).view(at::kByte);
}

at::Tensor field_from_bytes(const at::Tensor& rows, int64_t offset, int64_t count,
                            at::ScalarType dtype) {
  const int64_t elem = c10::elementSize(dtype);
  // Always a fresh copy: with 0 or 1 rows the narrowed slice is already "contiguous", and a view
  // of it would alias the receive buffer (and other fields) and keep a misaligned offset.
  return rows.narrow(1, offset, count * elem).clone(at::MemoryFormat::Contiguous).view(dtype);
}

}  // namespace ep_ops::collective

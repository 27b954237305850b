#include "watched_exchange.h"

#include <c10/util/Exception.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace ep_ops::collective {
namespace {

using Clock = std::chrono::steady_clock;
using Millis = std::chrono::milliseconds;

// NCCL's watchdog acts at the group's full timeout: give up well before it.
constexpr double kGiveUpFraction = 0.8;
// A rank that has waited this long (at most a quarter of its give-up time) checks in at the
// store. Far longer than any healthy exchange (tens of microseconds), far shorter than a timeout.
constexpr Millis kCheckInAfter{500};
// After an all-to-all that failed (an error rather than a timeout), how long to wait for the
// other survivors to check in before naming the ranks that did not.
constexpr Millis kCheckInGrace{2000};
// Polls that only yield the thread before the host starts sleeping between polls.
constexpr int kYieldPolls = 20000;

// This process's count of watched exchanges on the group: the same on every rank for the same
// call, since every rank makes the same ep_ops calls on a group in the same order.
int64_t next_exchange_number(const Group& group) {
  static std::mutex mutex;
  static std::unordered_map<std::string, int64_t> numbers;
  std::lock_guard<std::mutex> lock(mutex);
  return numbers[group->getGroupName()]++;
}

std::string check_in_key(int64_t number, int64_t rank) {
  return "ep_ops/header_exchange/" + std::to_string(number) + "/rank" + std::to_string(rank);
}

Millis group_timeout(const Group& group, const at::Device& device) {
  try {
    return group->getBackend(device.type())->getBackendOptions()->timeout;
  } catch (const c10::Error&) {  // a backend that does not report its options: c10d's default
    return Millis(30 * 60 * 1000);
  }
}

// The group's store, where the check-ins go; raises when the group has none.
c10::intrusive_ptr<c10d::Store> group_store(const Group& group) {
  auto store = group->getStore();
  TORCH_CHECK(store, "the process group has no store");
  return store;
}

// Writes this rank's check-in; when the store cannot take it, `note` says why.
void check_in(const Group& group, int64_t number, int64_t me, std::string& note) {
  try {
    group_store(group)->set(check_in_key(number, me), std::vector<uint8_t>{'1'});
  } catch (const std::exception& e) {
    note = std::string(" (the group's store did not take this rank's check-in: ") + e.what() + ")";
  }
}

// A slow exchange that completed takes its check-in back, so that the store does not collect a
// key per slow call over a long job.
void withdraw_check_in(const Group& group, int64_t number, int64_t me) {
  try {
    group_store(group)->deleteKey(check_in_key(number, me));
  } catch (const std::exception&) {  // a key left behind costs a few bytes
  }
}

// The peers that have not checked in under `number`, polled for up to `grace` until every peer
// has; every peer when the store cannot be read (`note` says so).
std::vector<int64_t> absent_peers(const Group& group, int64_t number, int64_t me, Millis grace,
                                  std::string& note) {
  const int64_t num_ranks = group->getSize();
  const auto deadline = Clock::now() + grace;
  std::vector<int64_t> absent;
  for (;;) {
    absent.clear();
    try {
      auto store = group_store(group);
      for (int64_t peer = 0; peer < num_ranks; ++peer) {
        if (peer != me && !store->check({check_in_key(number, peer)})) absent.push_back(peer);
      }
    } catch (const std::exception& e) {
      note = std::string(" (the group's store could not be read either: ") + e.what() + ")";
      absent.clear();
      for (int64_t peer = 0; peer < num_ranks; ++peer) {
        if (peer != me) absent.push_back(peer);
      }
      return absent;
    }
    if (absent.empty() || Clock::now() >= deadline) return absent;
    std::this_thread::sleep_for(Millis(20));
  }
}

// "rank 1" or "ranks 1, 3"
std::string ranks_text(const std::vector<int64_t>& ranks) {
  std::ostringstream out;
  out << (ranks.size() == 1 ? "rank " : "ranks ");
  for (size_t i = 0; i < ranks.size(); ++i) out << (i ? ", " : "") << ranks[i];
  return out.str();
}

// The pending all-to-all would hold the GPU stream and later wake NCCL's watchdog: abort the
// group's communicators so that it ends (the group is unusable from here on either way).
void abort_group(const Group& group) {
  try {
    group->abort();
  } catch (const std::exception&) {  // the error we are about to raise says more
  }
}

std::string seconds(Clock::duration d) {
  std::ostringstream out;
  out.precision(3);
  out << std::chrono::duration<double>(d).count() << " s";
  return out.str();
}

[[noreturn]] void raise_timed_out(const Group& group, const char* op, int64_t number, int64_t me,
                                  Clock::duration waited, Millis timeout, std::string note) {
  const auto absent = absent_peers(group, number, me, Millis(0), note);
  abort_group(group);
  std::ostringstream why;
  if (absent.empty()) {
    why << "every rank checked in at this exchange, but the all-to-all did not finish (a rank "
        << "gave up on it earlier, or a communicator fault)";
  } else {
    why << ranks_text(absent) << (absent.size() == 1 ? " has" : " have") << " not called ep_ops." << op
        << " (late, hung, or dead?)";
  }
  TORCH_CHECK(false, "ep_ops.", op, ": rank ", me, " timed out in the header exchange (the check-in ",
              "every ep_ops op starts with) after ", seconds(waited), " waiting for ",
              absent.empty() ? "the all-to-all" : ranks_text(absent), ": ", why.str(), note,
              ". ep_ops gives up at ", kGiveUpFraction * 100, "% of the process group's timeout (",
              seconds(timeout), "), before NCCL's watchdog would end the process; the group's ",
              "communicators are aborted: destroy the group and go on with a new one.");
}

[[noreturn]] void raise_failed(const Group& group, const char* op, int64_t number, int64_t me,
                               const std::string& cause) {
  std::string note;
  check_in(group, number, me, note);
  const auto absent = absent_peers(group, number, me, kCheckInGrace, note);
  abort_group(group);
  if (absent.empty()) {
    TORCH_CHECK(false, "ep_ops.", op, ": rank ", me, "'s header exchange (the check-in every ep_ops ",
                "op starts with) failed although every rank reached it. Cause: ", cause);
  }
  TORCH_CHECK(false, "ep_ops.", op, ": rank ", me, " lost ", ranks_text(absent), " in the header ",
              "exchange (the check-in every ep_ops op starts with): the all-to-all failed and ",
              ranks_text(absent), " never reached it (has ", ranks_text(absent), " died?)", note,
              ". Cause: ", cause);
}

}  // namespace

bool cpu_groups_use_watched_exchange() {
  const char* mode = std::getenv("EP_OPS_HEADER_EXCHANGE");
  return mode != nullptr && std::strcmp(mode, "all_to_all") == 0;
}

at::Tensor watched_all_to_all_rows(const Group& group, const char* op, const at::Tensor& row,
                                   const at::Device& device) {
  const int64_t num_ranks = group->getSize(), me = group->getRank();
  const int64_t number = next_exchange_number(group);
  auto send = row.unsqueeze(0).expand({num_ranks, row.size(0)}).contiguous().to(device);
  auto recv = at::empty_like(send);
  std::vector<int64_t> equal;
  auto work = group->alltoall_base(recv, send, equal, equal);

  const Millis timeout = group_timeout(group, device);
  const auto give_up = std::chrono::duration_cast<Millis>(timeout * kGiveUpFraction);
  const auto check_in_after = std::min(kCheckInAfter, give_up / 4);
  const auto start = Clock::now();
  bool tried_check_in = false, timed_out = false;
  std::string note, failure;
  try {
    for (int polls = 0; !work->isCompleted(); ++polls) {
      const auto waited = Clock::now() - start;
      if (!tried_check_in && waited >= check_in_after) {
        check_in(group, number, me, note);
        tried_check_in = true;
      }
      if (waited >= give_up) {
        timed_out = true;
        break;
      }
      if (polls < kYieldPolls) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
    if (!timed_out) work->wait();  // raises the error it ended with; orders our stream after it
  } catch (const c10::Error& e) {
    failure = e.what_without_backtrace();
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (timed_out) raise_timed_out(group, op, number, me, Clock::now() - start, timeout, note);
  if (!failure.empty()) raise_failed(group, op, number, me, failure);
  if (tried_check_in) withdraw_check_in(group, number, me);
  return recv.cpu();
}

}  // namespace ep_ops::collective

// Buffer.dispatch returns the received tokens per local expert as a Python list. Without help its
// num_recv_tokens_per_expert.tolist() waits for the whole data kernel: a second sync after exact
// mode's own, and a host that can no longer queue the next kernels ahead of the GPU. So the
// wrapper asks first (request_dispatch_counts); the group's next NVLink exact-mode dispatch then
// counts them in notify (~10 us more), reads them on the host with the totals (the sync exact
// mode needs anyway) and leaves them here for the wrapper to take. A raw op call that nobody
// asked for pays nothing.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ep_ops {

// Asks the group's next dispatch to leave its counts; drops any it left before.
void request_dispatch_counts(const std::string& group_name);

// Whether the counts were asked for since the group's last dispatch; the request goes.
bool take_dispatch_counts_request(const std::string& group_name);

// Replaces what the group's last dispatch left.
void leave_dispatch_counts(const std::string& group_name, std::vector<int64_t> counts);

// What the group's last dispatch left, once (the entry goes); nullopt when it left nothing.
std::optional<std::vector<int64_t>> take_dispatch_counts(const std::string& group_name);

}  // namespace ep_ops

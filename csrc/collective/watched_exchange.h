// The header exchange of device groups (NCCL), watched by the host so that a lost peer ends in
// an ep_ops error naming it instead of in the communicator's watchdog.
#pragma once

#include <ATen/ATen.h>

#include "process_group.h"

namespace ep_ops::collective {

// Every rank's `row` in one all-to-all, [R, width] on the CPU. The host polls the all-to-all
// and gives up at kGiveUpFraction of the group's timeout (NCCL's watchdog takes the process
// down at the full timeout, with a message naming no peer): it then names the ranks that never
// reached this exchange, aborts the group's communicators (the pending all-to-all would hold
// the GPU and later wake the watchdog) and raises. Which ranks are absent comes from the
// group's store: a rank that has waited kCheckInAfter writes "I am here" under this exchange's
// number (every rank makes the same ep_ops calls on a group, so the numbers agree) and takes it
// back once the exchange completes. Healthy calls never touch the store.
at::Tensor watched_all_to_all_rows(const Group& group, const char* op, const at::Tensor& row,
                                   const at::Device& device);

// True when CPU groups should use watched_all_to_all_rows too (EP_OPS_HEADER_EXCHANGE=
// all_to_all): the way the CPU suite tests the device groups' path over gloo.
bool cpu_groups_use_watched_exchange();

}  // namespace ep_ops::collective

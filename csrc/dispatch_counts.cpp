#include "dispatch_counts.h"

#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <utility>

namespace ep_ops {
namespace {

struct Registry {
  std::mutex mutex;
  std::unordered_set<std::string> requested;
  std::unordered_map<std::string, std::vector<int64_t>> counts;
};

Registry& registry() {
  static auto* r = new Registry();  // never freed: ops may run during interpreter shutdown
  return *r;
}

}  // namespace

void request_dispatch_counts(const std::string& group_name) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.requested.insert(group_name);
  r.counts.erase(group_name);
}

bool take_dispatch_counts_request(const std::string& group_name) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.requested.erase(group_name) > 0;
}

void leave_dispatch_counts(const std::string& group_name, std::vector<int64_t> counts) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.counts[group_name] = std::move(counts);
}

std::optional<std::vector<int64_t>> take_dispatch_counts(const std::string& group_name) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.counts.find(group_name);
  if (it == r.counts.end()) return std::nullopt;
  std::vector<int64_t> taken = std::move(it->second);
  r.counts.erase(it);
  return taken;
}

}  // namespace ep_ops

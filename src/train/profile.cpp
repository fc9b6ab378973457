#include "longlora/train/profile.h"

#include <kineto/ActivityType.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <sstream>
#include <unordered_map>
#include <vector>

namespace longlora::train {
namespace {

namespace prof = torch::autograd::profiler;
using Kind = torch::profiler::impl::ActivityType;

struct Row {
  double ns = 0;
  int64_t calls = 0;
};

// Kernel names carry whole template argument lists: cut to one table-friendly width.
std::string short_name(std::string n) {
  constexpr size_t kMax = 110;
  if (n.size() <= kMax) return n;
  return n.substr(0, kMax - 3) + "...";
}

std::string table(const std::string& title, const std::string& key,
                  const std::unordered_map<std::string, Row>& rows, int top) {
  std::vector<std::pair<std::string, Row>> v(rows.begin(), rows.end());
  double total = 0;
  for (const auto& [n, r] : v) total += r.ns;
  std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  std::ostringstream s;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f", total / 1e6);
  s << "\n" << title << " (total " << buf << " ms)\n\n| " << key << " | ms | % | calls |\n|---|---|---|---|\n";
  for (int i = 0; i < static_cast<int>(v.size()) && i < top; ++i) {
    std::snprintf(buf, sizeof buf, "%.2f | %.1f", v[i].second.ns / 1e6, total > 0 ? 100.0 * v[i].second.ns / total : 0.0);
    std::string name = short_name(v[i].first);
    std::replace(name.begin(), name.end(), '|', '/');
    s << "| " << name << " | " << buf << " | " << v[i].second.calls << " |\n";
  }
  return s.str();
}

}  // namespace

std::string profile_tables(const std::function<void()>& f, int top, bool cuda) {
  const prof::ProfilerConfig cfg(prof::ProfilerState::KINETO);
  std::set<Kind> acts{Kind::CPU};
  if (cuda) acts.insert(Kind::CUDA);
  prof::prepareProfiler(cfg, acts);
  prof::enableProfiler(cfg, acts);
  f();
  auto result = prof::disableProfiler();  // waits for the device's records
  const auto& ev = result->events();

  const auto op_kind = static_cast<uint8_t>(libkineto::ActivityType::CPU_OP);
  std::unordered_map<uint64_t, std::string> op_of;  // correlation id -> op name
  std::map<uint64_t, std::vector<const prof::KinetoEvent*>> ops_by_thread;
  std::unordered_map<std::string, Row> by_kernel, by_op;
  for (const auto& e : ev) {
    if (e.activityType() != op_kind || e.deviceType() != c10::DeviceType::CPU) continue;
    op_of[e.correlationId()] = e.name();
    ops_by_thread[e.startThreadId()].push_back(&e);
  }
  for (const auto& e : ev) {
    if (e.deviceType() != c10::DeviceType::CUDA || e.activityType() == op_kind) continue;
    auto& k = by_kernel[e.name()];
    k.ns += e.durationNs();
    k.calls++;
    auto it = op_of.find(e.linkedCorrelationId());
    auto& o = by_op[it == op_of.end() ? "(no op)" : it->second];
    o.ns += e.durationNs();
    o.calls++;
  }
  if (!by_kernel.empty())
    return table("GPU time by kernel", "kernel", by_kernel, top) +
           table("GPU time by the ATen op that launched it", "op", by_op, top);

  // CPU: self time of each op, from the nesting of ops on each thread.
  std::unordered_map<std::string, Row> self;
  for (auto& [tid, ops] : ops_by_thread) {
    std::sort(ops.begin(), ops.end(), [](auto* a, auto* b) {
      return a->startNs() != b->startNs() ? a->startNs() < b->startNs() : a->endNs() > b->endNs();
    });
    std::vector<std::pair<const prof::KinetoEvent*, double>> stack;  // op, its children's time
    auto close = [&](uint64_t until) {
      while (!stack.empty() && stack.back().first->endNs() <= until) {
        auto [op, child] = stack.back();
        stack.pop_back();
        auto& r = self[op->name()];
        r.ns += std::max(0.0, static_cast<double>(op->durationNs()) - child);
        r.calls++;
        if (!stack.empty()) stack.back().second += op->durationNs();
      }
    };
    for (auto* op : ops) {
      close(op->startNs());
      stack.push_back({op, 0.0});
    }
    close(UINT64_MAX);
  }
  return table("CPU self time by op", "op", self, top);
}

}  // namespace longlora::train

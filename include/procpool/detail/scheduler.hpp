// procpool - which worker runs which task: hands queued tasks to the least
// loaded workers, sizes each worker's queue by how long tasks run, and takes
// back tasks queued behind a busy worker when another is idle. Runs on the
// dispatcher's I/O thread, with its lock held.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <vector>

#include "estimate.hpp"
#include "protocol.hpp"
#include "ring.hpp"
#include "shm.hpp"
#include "worker_state.hpp"

namespace procpool::detail {

using Workers = std::vector<std::unique_ptr<Worker>>;

class Scheduler {
 public:
  struct Settings {
    std::size_t max_in_flight = 1;        // Options::max_tasks_in_flight
    std::size_t max_tasks_per_child = 0;  // Options::maxtasksperchild
    bool worker_spin = false;             // Options::worker_spin
  };

  /// `shm_threshold`: frames larger than this go through shared memory to
  /// the workers that can reach it; 0 for none.
  Scheduler(Settings settings, std::shared_ptr<TaskMemory> task_memory, std::size_t shm_threshold)
      : settings_(settings), task_memory_(std::move(task_memory)), shm_threshold_(shm_threshold) {}

  /// How long tasks run: results add to it.
  RunTimeEstimate task_time{0.2};

  /// Tasks each worker may hold: one while tasks are long (so none waits
  /// behind another on a busy worker), more while they are short.
  std::size_t window() const {
    const auto ns = task_time.get();
    if (!ns || *ns > 1'000'000.0) return 1;
    return settings_.max_in_flight;
  }

  /// Sends queued tasks to workers with room for them, front first.
  void assign(Ring<Task>& pending, Workers& workers) {
    const std::size_t limit = window();
    while (!pending.empty()) {
      Task& task = pending.front();
      if (task.job->cancelled()) {
        pending.pop_front();
        continue;
      }
      Worker* best = nullptr;
      for (auto& w : workers) {
        if (!w->takes_tasks() || w->stalled || w->held.size() >= limit || !has_claim_slot(*w)) continue;
        if (waits_for_predecessor(*w, workers)) continue;
        // The least loaded; of those, one that is ready over one still starting.
        if (best == nullptr || w->held.size() < best->held.size() ||
            (w->held.size() == best->held.size() && w->ready() && !best->ready())) {
          best = w.get();
        }
      }
      if (best == nullptr) return;
      TaskHeader header;
      header.id = ++best->last_id;
      // More queued to follow this one at once: its worker may look for them before sleeping.
      if (settings_.worker_spin && pending.size() > 1 && !task.job->streamed()) header.flags |= task_more_queued;
      if (best->held.empty()) best->front_since = Clock::now();
      task.id = header.id;
      if (best->claims) best->claims.offer(header.id);
      send(*best, task, header);
      best->held.push_back(std::move(task));
      if (settings_.max_tasks_per_child != 0 && ++best->sent >= settings_.max_tasks_per_child) best->retiring = true;
      pending.pop_front();
    }
  }

  /**
   * When a worker is idle and no task waits for one, takes back the tasks
   * queued behind another worker's running task, so they run now on the idle
   * one instead of after it: one that runs long, has stopped, loops or dies
   * never holds them. A task is taken back only if its worker has not started
   * it (ClaimArea::revoke), so it runs exactly once.
   */
  void rebalance(Ring<Task>& pending, Workers& workers) {
    if (!pending.empty()) return;
    const bool idle = std::any_of(workers.begin(), workers.end(), [&](const auto& w) {
      return w->ready() && w->takes_tasks() && w->held.empty() && !waits_for_predecessor(*w, workers);
    });
    if (!idle) return;
    std::vector<Task> taken;
    for (auto& w : workers) {
      if (!w->claiming || w->held.size() < 2) continue;
      // From the back: the worker claims its tasks in order, so once one is
      // started, those before it are too.
      // The front is the one it runs (or is about to): it stays.
      const std::size_t before = taken.size();
      while (w->held.size() > 1 && w->claims.revoke(w->held[w->held.size() - 1].id)) {
        Task task = std::move(w->held[w->held.size() - 1]);
        w->held.erase(w->held.size() - 1);
        task.shm.reset();  // the copy it was sent in: the worker skips it unread
        taken.push_back(std::move(task));
      }
      if (taken.size() == before) continue;
      // Not straight back to where they waited: it gets more once it answers.
      w->stalled = true;
      std::reverse(taken.begin() + static_cast<std::ptrdiff_t>(before), taken.end());
    }
    for (auto task = taken.rbegin(); task != taken.rend(); ++task) pending.push_front(std::move(*task));
    if (!taken.empty()) assign(pending, workers);
  }

 private:
  /// Whether `w` replaces a worker of its slot that still runs its last
  /// tasks (maxtasksperchild): it starts early, but takes tasks only once
  /// that one is done, so no more than `processes` tasks ever run at once.
  static bool waits_for_predecessor(const Worker& w, const Workers& workers) {
    return std::any_of(workers.begin(), workers.end(), [&](const auto& other) {
      return other.get() != &w && other->slot == w.slot && other->retiring && !other->held.empty();
    });
  }

  /// Whether the worker's claim slot for its next task is free: the oldest
  /// task it holds must not share it (a task taken back and sent elsewhere
  /// again and again uses up ids while the one before it runs on).
  static bool has_claim_slot(const Worker& w) {
    return !w.claims || w.held.empty() || w.last_id + 1 - w.held.front().id < w.claims.slots();
  }

  /// Queues a task for its worker, after its header: the frame through
  /// shared memory if it is large (where it was encoded, TaskMemory, or else
  /// copied there now).
  void send(Worker& w, Task& task, const TaskHeader& header) {
    char head[task_header_size];
    header.encode(head);
    const TaskBytes& frame = *task.frame;
    // Storage over the threshold may be in shared memory (even when the frame
    // is smaller: its vector grew past it); then a reference is all it takes.
    std::vector<char> ref;
    if (w.shm && task_memory_->may_place(frame.capacity())) ref = task_memory_->reference(frame.data(), frame.size());
    if (w.shm && ref.empty() && frame.size() > shm_threshold_) {
      ref = task_memory_->pass(frame.data(), frame.size(), task.shm);
    }
    if (!ref.empty()) {
      w.link->send(std::make_shared<TaskBytes>(ref.begin(), ref.end()), head);
      return;
    }
    w.link->send(task.frame, head);
  }

  const Settings settings_;
  std::shared_ptr<TaskMemory> task_memory_;
  const std::size_t shm_threshold_;
};

}  // namespace procpool::detail

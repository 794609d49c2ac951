// procpool - which worker runs which task: hands queued tasks to the least
// loaded workers, sizes each worker's queue by how long tasks run, and takes
// back tasks queued behind a busy worker, or left unread by a stopped one,
// when another is idle. Runs on the dispatcher's I/O thread, with its lock
// held.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
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
        if (!w->takes_tasks() || stalled(*w) || w->held.size() >= limit || !has_claim_slot(*w)) continue;
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
    if (!pending.empty() || !has_idle(workers)) return;
    bool taken = false;
    // The front is the one it runs (or is about to): it stays.
    for (auto& w : workers) taken = take_back(*w, 1, pending) || taken;
    if (taken) assign(pending, workers);
  }

  /// How long a worker may leave the first task it holds unread (not
  /// started) while another is idle: then all it holds is taken back.
  static constexpr std::chrono::milliseconds unread_limit{20};
  /// How often to look whether a worker tasks were taken back from has read
  /// past them, while tasks wait.
  static constexpr std::chrono::milliseconds stalled_recheck{10};

  /**
   * Notes since when each worker has left its first task unread. One that
   * left it unread for unread_limit while another worker is idle (it was
   * stopped, or gets no CPU) loses all it holds to the idle one: an idle
   * worker that was sent a task and then stopped holds it no longer than
   * that. Returns when to look again.
   */
  std::optional<Clock::time_point> take_back_unread(Ring<Task>& pending, Workers& workers, Clock::time_point now) {
    std::optional<Clock::time_point> next;
    auto sooner = [&](Clock::time_point t) { next = next ? std::min(*next, t) : t; };
    std::optional<bool> idle;  // looked up once a worker needs it
    bool assignable = false;
    for (auto& w : workers) {
      // One that reads past the tasks taken back from it says nothing:
      // while tasks wait, look again soon.
      if (w->stalled && w->held.empty() && !pending.empty() && w->takes_tasks()) {
        if (stalled(*w)) {
          sooner(now + stalled_recheck);
        } else {
          assignable = true;
        }
      }
      if (!note_unread(*w, now)) continue;
      if (!idle) idle = pending.empty() && has_idle(workers);
      // A retiring worker's successor waits for it to finish its tasks.
      if (!*idle && !(pending.empty() && w->retiring && successor_idle(*w, workers))) continue;
      const auto deadline = *w->unread_since + unread_limit;
      if (now < deadline) {
        sooner(deadline);
        continue;
      }
      assignable = take_back(*w, 0, pending) || assignable;
    }
    if (assignable) assign(pending, workers);
    return next;
  }

  /// Whether `w`'s first task is waiting for it to be read: sent, not
  /// started. Notes since when (Worker::unread_since).
  static bool note_unread(Worker& w, Clock::time_point now) {
    if (!w.claiming || !w.ready() || w.held.empty() || w.claims.was_started(w.held.front().id)) {
      w.unread_since.reset();
      return false;
    }
    if (!w.unread_since || w.unread_id != w.held.front().id) {
      w.unread_since = now;
      w.unread_id = w.held.front().id;
    }
    return true;
  }

  /**
   * Takes back the tasks `w` has not started, all but the first `keep` it
   * holds, to the front of `pending` in the order they were queued. Returns
   * whether it took any: then `w` gets no more tasks until it has answered
   * one or read past those (Worker::stalled).
   */
  static bool take_back(Worker& w, std::size_t keep, Ring<Task>& pending) {
    if (!w.claiming || w.held.size() <= keep) return false;
    // From the back: the worker claims its tasks in order, so once one is
    // started, those before it are too.
    bool taken = false;
    while (w.held.size() > keep && w.claims.revoke(w.held[w.held.size() - 1].id)) {
      Task task = std::move(w.held[w.held.size() - 1]);
      w.held.erase(w.held.size() - 1);
      task.shm.reset();  // the copy it was sent in: the worker skips it unread
      pending.push_front(std::move(task));
      taken = true;
    }
    // Not straight back to where they waited.
    if (taken) w.stalled = true;
    return taken;
  }

 private:
  /// Whether some worker is ready for a task and holds none.
  static bool has_idle(Workers& workers) {
    return std::any_of(workers.begin(), workers.end(), [&](const auto& w) {
      return w->ready() && w->takes_tasks() && w->held.empty() && !stalled(*w) && !waits_for_predecessor(*w, workers);
    });
  }

  /// Whether the successor of retiring worker `w` is ready, holds nothing,
  /// and waits only for `w` to finish.
  static bool successor_idle(const Worker& w, const Workers& workers) {
    return std::any_of(workers.begin(), workers.end(), [&](const auto& other) {
      return other.get() != &w && other->slot == w.slot && other->ready() && other->takes_tasks() &&
             other->held.empty();
    });
  }

  /// Whether `w` gets no tasks for now, because tasks were taken back from
  /// it; that ends once it has read past them (or answered one).
  static bool stalled(Worker& w) {
    if (w.stalled && w.claims && w.claims.last_skipped() == w.last_id) w.stalled = false;
    return w.stalled;
  }

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

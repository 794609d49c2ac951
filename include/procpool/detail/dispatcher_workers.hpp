// procpool - the dispatcher's workers: starting them (outside its lock),
// burying the dead and settling what they held, stopping those over their
// task's time limit, and stopping them all. Part of dispatcher.hpp.
#pragma once

#include <csignal>

#include "dispatcher.hpp"

namespace procpool::detail {

inline void Dispatcher::start_missing_workers(std::unique_lock<std::mutex>& lock) {
  // A fork pool made before procpool::init (a global, made before main())
  // starts its workers at init or at its first call (DeferredStarts).
  if (start_at_init_) {
    if (!init_called() && state_ == State::running && pending_.empty() && streams_ == 0) return;
    start_at_init_ = false;
    if (!init_called() && state_ == State::running) warn_forked_at_first_call();
  }
  // The first time, every worker starts whatever the state: a pool closed
  // as soon as it is made still runs its initializer once in each worker.
  const bool first = std::exchange(first_start_, false);
  auto want = [&] { return !broken_ && (first || wants_workers()); };
  if (!want()) return;
  // After a failed start, wait for the backoff unless tasks have nowhere to
  // go (no worker is left, nor an ended one's pipes) and have waited for
  // one attempt already.
  if (start_failure_ && Clock::now() < next_start_ &&
      (start_failures_ < 2 || pending_.empty() || !workers_.empty() || relay_holds_ended())) {
    return;
  }
  for (std::size_t slot = 0; slot < processes_ && !broken_; ++slot) {
    std::size_t in_slot = 0;
    bool covered = false;
    for (auto& w : workers_) {
      if (w->slot != slot) continue;
      ++in_slot;
      // A dying worker is buried before it is replaced; only one finishing
      // its last tasks gets its successor early.
      covered = covered || !w->retiring;
    }
    // At most two processes a slot: the one finishing up and its successor.
    if (covered || in_slot >= 2) continue;
    // Started without the lock: submitting threads do not wait for a fork.
    // Only this thread adds or removes workers.
    lock.unlock();
    std::unique_ptr<Worker> w;
    try {
      w = start_worker(slot);
    } catch (const std::exception& e) {
      lock.lock();
      start_failed(slot, e);
      return;
    }
    lock.lock();
    start_failure_.reset();
    start_failures_ = 0;
    start_backoff_ = std::chrono::milliseconds(0);
    workers_.push_back(std::move(w));  // reserved: cannot throw
    // Closed or terminated meanwhile: the other slots may need no worker now.
    if (state_ == State::terminating || !want()) return;
  }
}

/// Whether the output relay still reads pipes of workers that ended: it
/// closes them, freeing their fds, once it has read to their EOF.
inline bool Dispatcher::relay_holds_ended() const { return relay_ && relay_->open_pipes() > 2 * workers_.size(); }

/// After a worker exits: the next start comes at once, and its failures are
/// counted from none (tasks fail only after two, and while no worker or
/// ended worker's pipes are left, only once the backoff has grown again).
inline void Dispatcher::retry_starts_now() {
  next_start_ = Clock::now();
  start_backoff_ = std::chrono::milliseconds(0);
  start_failures_ = 0;
}

/// Starts a worker in `slot` and queues its configuration. Without the lock.
inline std::unique_ptr<Worker> Dispatcher::start_worker(std::size_t slot) {
  auto w = std::make_unique<Worker>();
  w->inbox = Inbox(max_message_);
  w->slot = slot;
  // Slots for every task a worker may hold, twice over (claims.hpp). Where
  // there is no memfd to be had the worker runs without: its queued tasks
  // then cannot be taken back.
  if (transport_->shares_memory()) {
    try {
      w->claims = ClaimArea::create(4 * std::min<std::size_t>(max_in_flight_, std::size_t{1} << 16) + 8);
    } catch (const std::system_error&) {
    }
  }
  std::optional<OutputRelay::Pipes> output;
  if (relay_) output = OutputRelay::open();
  w->link = transport_->start(output ? output->child() : ChildStdio{}, w->claims ? w->claims.fd() : -1);
  w->claims.release_fd();
  try {
    if (output) relay_->attach(slot, w->pid(), std::move(*output));
    const ShmBuffer* probe = shm_threshold_ != 0 ? task_memory_->probe() : nullptr;
    TaskBytes config;
    WorkerConfig{.slot = slot,
                 .max_tasks = max_tasks_per_child_,
                 .initializer = init_id_,
                 .max_message = max_message_,
                 .max_rss = max_rss_,
                 .address_space_limit = address_space_limit_,
                 .shm_threshold = shm_threshold_,
                 .remote = transport_->shares_memory() ? 0u : 1u,
                 .pool_pid = static_cast<std::int32_t>(::getpid()),
                 .probe_fd = probe != nullptr ? probe->fd.get() : -1,
                 .probe_id = probe != nullptr ? probe->id : 0,
                 .initializer_state = init_state_}
        .encode(config);
    w->link->send(std::make_shared<TaskBytes>(std::move(config)));
  } catch (...) {
    // Started, but not to be used: it must not outlive this.
    w->link->kill(SIGKILL);
    w->link->reap();
    throw;
  }
  return w;
}

/// A start failed: start_failure_ says why and next_start_ when to try again.
inline void Dispatcher::start_failed(std::size_t slot, const std::exception& e) {
  if (const auto* refused = dynamic_cast<const StartRefused*>(&e)) {
    if (refused->ended()) {
      broken_ = ChunkFailure{ChunkFailure::Kind::ended, 0, slot, 0, e.what()};
      return;
    }
    broken_ = ChunkFailure{ChunkFailure::Kind::start_failed, 0, slot, 0,
                           fmt::format("the pool could not start worker {}: {}", slot, e.what())};
    return;
  }
  start_failure_ =
      ChunkFailure{ChunkFailure::Kind::start_failed, 0, slot, 0,
                   fmt::format("the pool could not start worker {}: {}; it goes on trying", slot, e.what())};
  start_backoff_ = std::clamp(2 * start_backoff_, std::chrono::milliseconds(50), max_start_backoff);
  next_start_ = Clock::now() + start_backoff_;
  // Tasks fail for it only once a second attempt (after the backoff)
  // failed too: a worker about to exit may free what the first lacked.
  ++start_failures_;
}

/// A worker has exited: collect what it still sent, reap it, and settle
/// what it held. Tasks run one after another in the order sent, so only
/// the first it held can have started: that one fails (or is retried), the
/// others go back to the front of the queue and run elsewhere.
inline void Dispatcher::bury(Worker& w, std::vector<Delivery>& deliveries) {
  if (!w.eof) reader_.read(w, deliveries);  // what it sent before dying still counts
  if (w.ready() && w.held.empty() && !w.failure && !w.status) {
    w.link->release();  // an ordinary exit (maxtasksperchild, close): no news to wait for
    return;
  }
  const int status = w.status ? *w.status : w.link->reap();
  ChunkFailure lost =
      w.failure.value_or(ChunkFailure{ChunkFailure::Kind::worker_lost, w.pid(), w.slot, 0, {}, w.where()});
  lost.wait_status = status;
  // One stopped over its initializer's time may have just said ready.
  const bool init_timed_out = w.failure && w.failure->kind == ChunkFailure::Kind::initializer;
  if ((!w.ready() || init_timed_out) && !broken_) judge_early_death(w, status);
  if (w.ready()) early_deaths_ = 0;
  const bool front_started = w.ready() && !w.leaving;
  std::vector<Task> again;
  for (std::size_t k = 0; k < w.held.size(); ++k) {
    Task task = std::move(w.held[k]);
    task.shm.reset();  // the worker is gone: its buffer is free
    // Which one ran: its claim word says; without claims, only the first
    // it held can have started (tasks run in the order sent).
    const bool started = w.claiming ? w.claims.was_started(task.id) : k == 0 && front_started;
    if (started && w.claiming &&
        (lost.kind == ChunkFailure::Kind::worker_lost || lost.kind == ChunkFailure::Kind::timeout)) {
      lost.running_item = w.claims.running_item(task.id);
    }
    if (started) {
      const bool retry =
          lost.kind == ChunkFailure::Kind::worker_lost && task.attempts < task.job->retries().value_or(retries_);
      if (!retry && task.attempts != 0 && lost.kind == ChunkFailure::Kind::worker_lost) {
        ChunkFailure last = lost;
        last.detail = fmt::format("The task ran {} times (retries = {}), and its worker was lost each time",
                                  task.attempts + 1, task.attempts);
        deliveries.push_back({std::move(task.job), task.chunk, failure_outcome(last), task.items()});
        continue;
      }
      if (!retry) {
        deliveries.push_back({std::move(task.job), task.chunk, failure_outcome(lost), task.items()});
        continue;
      }
      ++task.attempts;
    }
    again.push_back(std::move(task));
  }
  w.held.clear();
  for (auto task = again.rbegin(); task != again.rend(); ++task) pending_.push_front(std::move(*task));
  if (broken_) fail_all_pending(*broken_, deliveries);
}

/// A worker died before it was ready: decides whether the pool must stop
/// starting workers (broken_), as when its initializer fails, since a new
/// one would only die the same way.
inline void Dispatcher::judge_early_death(Worker& w, int status) {
  const std::string hint = transport_->start_hint();
  const bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
  // Forked by the fork server and out of fds: not a main() that forgot init.
  const bool no_fds = WIFEXITED(status) && WEXITSTATUS(status) == exit_no_fds;
  if (reader_.init_failure) {
    broken_ = *reader_.init_failure;
  } else if (w.failure && w.failure->kind == ChunkFailure::Kind::initializer) {
    broken_ = *w.failure;  // stopped for running past the task timeout
  } else if (w.stage == Stage::started && !w.failure) {
    // It reached its loop, so it died in the initializer: that is not
    // retried (it would fail again, and again).
    broken_ = ChunkFailure{ChunkFailure::Kind::initializer,
                           w.pid(),
                           w.slot,
                           status,
                           fmt::format("the worker {} while running it", describe_wait_status(status)),
                           w.where()};
  } else if (!hint.empty() && !w.failure && !killed && !no_fds && status != wait_status_unknown &&
             status != wait_status_server_lost) {
    // A re-run binary that never reached the loop: main() did not hand it over.
    broken_ = ChunkFailure{ChunkFailure::Kind::start_failed,
                           w.pid(),
                           w.slot,
                           status,
                           fmt::format("{} {} before it was ready. {}", worker_label(w.slot, w.pid(), w.where()),
                                       describe_wait_status(status), hint),
                           w.where()};
  } else if (++early_deaths_ > 3 * processes_ + 3) {
    broken_ = ChunkFailure{ChunkFailure::Kind::start_failed,
                           w.pid(),
                           w.slot,
                           status,
                           fmt::format("workers keep dying before they are ready (the last one, {}, {}{}); "
                                       "the pool stopped replacing them",
                                       worker_label(w.slot, w.pid(), w.where()), describe_wait_status(status),
                                       no_fds ? ": it found no free file descriptor for its pipes" : ""),
                           w.where()};
  }
}

/// Stops workers whose running task has outlived its time limit: SIGTERM,
/// then SIGKILL after a grace; and those stopped in the middle of a
/// message. Returns the next time to look again.
inline std::optional<Clock::time_point> Dispatcher::enforce_timeouts() {
  std::optional<Clock::time_point> next;
  auto sooner = [&](Clock::time_point t) { next = next ? std::min(*next, t) : t; };
  const auto now = Clock::now();
  bool taken = false;  // tasks were taken back from a worker that left them unread
  // SIGTERM now, SIGKILL after the grace; `failure` is what its tasks get.
  auto stop = [&](Worker& w, ChunkFailure failure) {
    w.failure = std::move(failure);
    w.link->kill(SIGTERM);
    w.kill_at = now + kill_grace;
    sooner(*w.kill_at);
  };
  for (auto& w : workers_) {
    if (w->exited) continue;
    if (w->partial_since && !w->eof) {
      // A worker writes each message whole; one that stops midway (a task
      // wrote to the result pipe itself) would leave its task unanswered.
      const auto deadline = *w->partial_since + stall_limit;
      if (now >= deadline) {
        protocol_violation(*w, fmt::format("the worker stopped sending in the middle of a message (nothing "
                                           "more for {} s); did the task write to the worker's result pipe?",
                                           stall_limit.count()));
        continue;
      }
      sooner(deadline);
    }
    if (w->kill_at) {
      if (now >= *w->kill_at) {
        w->link->kill(SIGKILL);
        w->kill_at.reset();
      } else {
        sooner(*w->kill_at);
      }
      continue;
    }
    if (w->stage == Stage::started && init_id_ != 0 && task_timeout_.count() > 0 && !w->failure) {
      // Options::task_timeout bounds the initializer too: one that hangs is
      // an initializer failure, not a pool that waits for ever.
      const auto deadline = w->front_since + clamp_timeout(task_timeout_);
      if (now < deadline) {
        sooner(deadline);
        continue;
      }
      stop(*w, ChunkFailure{ChunkFailure::Kind::initializer, w->pid(), w->slot, 0,
                            fmt::format("it ran longer than the task timeout ({} ms) and was stopped",
                                        task_timeout_.count()),
                            w->where()});
      continue;
    }
    if (!timeouts_used_ || w->held.empty() || !w->ready() || w->failure) continue;
    const auto limit = w->held.front().job->task_timeout().value_or(task_timeout_);
    if (limit.count() <= 0) continue;
    if (w->claiming && !w->claims.was_started(w->held.front().id)) {
      // Not started yet: its clock has not started either. Look again a
      // little later. A worker that leaves it unread for as long as it may
      // run, and a second at least (stopped, say), loses its tasks, none
      // of them started, and is stopped.
      Scheduler::note_unread(*w, now);
      const auto unread_for = std::max<Clock::duration>(clamp_timeout(limit), std::chrono::seconds(1));
      if (now - *w->unread_since >= unread_for && Scheduler::take_back(*w, 0, pending_)) {
        taken = true;
        if (w->held.empty()) {
          stop(*w, ChunkFailure{ChunkFailure::Kind::timeout, w->pid(), w->slot, 0, fmt::format("{} ms", limit.count()),
                                w->where()});
          continue;
        }
      }
      w->front_since = now;
      sooner(now + std::min<Clock::duration>(clamp_timeout(limit), std::chrono::milliseconds(10)));
      continue;
    }
    const auto deadline = w->front_since + clamp_timeout(limit);
    if (now < deadline) {
      sooner(deadline);
      continue;
    }
    stop(*w, ChunkFailure{ChunkFailure::Kind::timeout, w->pid(), w->slot, 0, fmt::format("{} ms", limit.count()),
                          w->where()});
  }
  if (taken) scheduler_.assign(pending_, workers_);
  return next;
}

/// Stops every worker and fails every unfinished task; on the I/O thread,
/// so the workers' parent-death signal is still armed as a backstop.
inline void Dispatcher::stop_workers() noexcept {
  std::vector<Delivery> deliveries;
  {
    std::lock_guard lock(mutex_);
    if (state_ == State::stopped) return;
    state_ = State::stopped;
    ChunkFailure terminated{ChunkFailure::Kind::terminated, 0, 0, 0, {}};
    fail_all_pending(terminated, deliveries);
    // The tasks' frames (and shared buffers, which a worker may still be
    // reading) stay with their workers until these are gone below.
    // An idle worker (ready, holding nothing) exits on EOF at once, and the
    // normal way: what its tasks printed and left in stdio's buffers is
    // written out. It has a second for that; any other gets SIGTERM, and
    // 200 ms. Then SIGKILL.
    const auto now = Clock::now();
    std::vector<Clock::time_point> deadlines;
    for (auto& w : workers_) {
      const bool idle = w->held.empty() && w->stage == Stage::ready && !w->failure;
      w->link->close_sending();
      if (!idle) w->link->kill(SIGTERM);
      deadlines.push_back(now + (idle ? std::chrono::milliseconds(1000) : std::chrono::milliseconds(200)));
      for (auto& task : w->held) {
        deliveries.push_back({std::move(task.job), task.chunk, failure_outcome(terminated), task.items()});
      }
    }
    for (std::size_t k = 0; k < workers_.size(); ++k) {
      auto& w = workers_[k];
      while (!(w->status = w->link->try_reap())) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadlines[k] - Clock::now()).count();
        if (left <= 0) break;
        pollfd p{w->link->end_fd(), POLLIN, 0};
        ::poll(&p, 1, 1);
      }
    }
    for (auto& w : workers_) {
      if (w->status) continue;
      w->link->kill(SIGKILL);
      w->link->reap();
    }
    workers_.clear();
  }
  deliver_all(deliveries);
}

/// A fork pool made before procpool::init in a program that has not called
/// it: it forks at its first call, not when it was made. Said once.
inline void Dispatcher::warn_forked_at_first_call() {
  static std::atomic<bool> warned{false};
  if (warned.exchange(true)) return;
  fmt::print(stderr,
             "procpool: warning: a StartMethod::fork pool made before procpool::init(argc, argv), or in a program "
             "that never calls it, forks its workers at its first call, not when it is made. Call "
             "procpool::init(argc, argv) first in main().\n");
}

}  // namespace procpool::detail

// procpool - the dispatcher's entry points: what the pool, its calls and its
// jobs call. Part of dispatcher.hpp, out of line so that a program built with
// PROCPOOL_SEPARATE_COMPILATION compiles them once (config.hpp).
#pragma once

#include "config.hpp"
#include "dispatcher.hpp"

namespace procpool::detail {

PROCPOOL_ENGINE_INLINE Dispatcher::Dispatcher(const Options& options, std::unique_ptr<Transport> transport)
    : transport_(std::move(transport)),
      processes_(options.processes),
      max_tasks_per_child_(options.maxtasksperchild),
      max_in_flight_(std::max<std::size_t>(1, options.max_tasks_in_flight)),
      retries_(options.retries),
      task_timeout_(options.task_timeout),
      max_rss_(options.max_memory_per_child),
      address_space_limit_(options.memory_limit_per_child),
      max_message_(std::min<std::size_t>(options.max_message_bytes, 0xffffffffu)),
      task_memory_(std::make_shared<TaskMemory>(options.shared_memory_threshold)),
      shm_threshold_(transport_->shares_memory() ? task_memory_->threshold() : 0),
      init_id_(InitializerAccess::id(options.initializer)),
      init_state_(InitializerAccess::state(options.initializer)),
      init_shares_(InitializerAccess::shares(options.initializer)),
      scheduler_({.max_in_flight = max_in_flight_,
                  .max_tasks_per_child = max_tasks_per_child_,
                  .worker_spin = options.worker_spin},
                 task_memory_, shm_threshold_),
      reader_(max_message_, shm_threshold_, scheduler_.task_time, timeouts_used_) {
  wake_ = make_tracked("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); });
  workers_.reserve(2 * processes_);  // at most two a slot (start_missing_workers)
  if (options.worker_output != WorkerOutput::inherit || options.on_worker_output) {
    relay_ = std::make_unique<OutputRelay>(options.worker_output, options.on_worker_output);
  }
  const bool forks = options.start_method == StartMethod::fork && options.backend.local();
  start_at_init_ = deferred_ = forks && !init_called();
  thread_ = InternalThread("the pool's I/O thread", [this] { io_loop(); });
  // A fork pool forks its first workers before the constructor returns, as
  // Python's Pool() does: a thread the program starts after it is in none
  // of those forks, and not counted by the threaded-fork check. Made
  // before procpool::init, it does so in init: see defer_start().
  if (forks && !deferred_) wait_first_round();
}

PROCPOOL_ENGINE_INLINE void Dispatcher::defer_start(const std::shared_ptr<Dispatcher>& self) {
  if (!self->deferred_) return;
  const bool added = DeferredStarts::instance().add(self, [](const std::shared_ptr<void>& pool) {
    static_cast<Dispatcher*>(pool.get())->start_deferred();
  });
  if (!added) self->start_deferred();  // init ran meanwhile
}

PROCPOOL_ENGINE_INLINE Dispatcher::~Dispatcher() { shutdown(); }

PROCPOOL_ENGINE_INLINE void Dispatcher::shutdown() noexcept {
  if (forked_copy()) return;
  terminate();
  runner_.stop();
}

PROCPOOL_ENGINE_INLINE void Dispatcher::start_deferred() {
  wake();
  wait_first_round();
}

PROCPOOL_ENGINE_INLINE void Dispatcher::open_stream() {
  require_owner();
  std::lock_guard lock(mutex_);
  if (state_ != State::running) throw_not_running();
  ++streams_;
}

PROCPOOL_ENGINE_INLINE void Dispatcher::close_stream() noexcept {
  bool last_on_closed_pool;
  {
    std::lock_guard lock(mutex_);
    last_on_closed_pool = --streams_ == 0 && state_ == State::closed;
  }
  // Only a closed pool waits for its streams to wind down.
  if (last_on_closed_pool) wake();
}

PROCPOOL_ENGINE_INLINE void Dispatcher::require_running() {
  require_owner();
  std::lock_guard lock(mutex_);
  if (state_ != State::running) throw_not_running();
}

PROCPOOL_ENGINE_INLINE void Dispatcher::submit_from(std::vector<Chunk>& chunks, bool in_stream) {
  require_owner();
  // Their frames' shared homes are made before taking the lock the I/O thread needs.
  std::vector<std::shared_ptr<TaskBytes>> frames;
  frames.reserve(chunks.size());
  for (auto& chunk : chunks) frames.push_back(std::make_shared<TaskBytes>(std::move(chunk.frame)));
  // Each job learns whose it is (to withdraw its tasks, to run callbacks).
  const JobState* attached = nullptr;
  for (auto& chunk : chunks) {
    if (chunk.job.get() == attached) continue;
    attached = chunk.job.get();
    chunk.job->attach(shared_from_this());
  }
  std::vector<Delivery> failed;
  {
    std::lock_guard lock(mutex_);
    if (state_ != State::running && !(in_stream && state_ == State::closed)) throw_not_running();
    for (std::size_t k = 0; k < chunks.size(); ++k) {
      Chunk& chunk = chunks[k];
      const TaskBytes& frame = *frames[k];
      if (broken_) {
        failed.push_back({std::move(chunk.job), chunk.index, failure_outcome(*broken_), TaskHead::count_of(frame)});
      } else if (frame.size() - frame_header_size > max_message_) {
        failed.push_back({std::move(chunk.job), chunk.index,
                          failure_outcome({ChunkFailure::Kind::protocol, 0, 0, 0,
                                           fmt::format("its task message ({} bytes) is larger than "
                                                       "Options::max_message_bytes ({})",
                                                       frame.size(), max_message_)}),
                          TaskHead::count_of(frame)});
      } else if (!chunk.shares.empty() && !transport_->shares_memory()) {
        failed.push_back({std::move(chunk.job), chunk.index,
                          failure_outcome({ChunkFailure::Kind::protocol, 0, 0, 0,
                                           "it passes a procpool::SharedMemory block, which cannot reach workers "
                                           "on other hosts (this pool's workers run on MPI ranks); pass the "
                                           "data as a std::vector instead"}),
                          TaskHead::count_of(frame)});
      } else {
        if (chunk.job->task_timeout() && !timeouts_used_) {
          // The running tasks' start times are kept from now on.
          timeouts_used_ = true;
          for (auto& w : workers_) w->front_since = Clock::now();
        }
        pending_.push_back(
            Task{std::move(chunk.job), chunk.index, 0, std::move(frames[k]), 0, {}, std::move(chunk.shares)});
      }
    }
  }
  chunks.clear();
  deliver_all(failed);
  wake();
}

PROCPOOL_ENGINE_INLINE std::size_t Dispatcher::withdraw(const JobState& job) {
  if (forked_copy()) return 0;
  std::lock_guard lock(mutex_);
  std::size_t withdrawn = 0;
  for (std::size_t k = pending_.size(); k-- > 0;) {
    if (pending_[k].job.get() != &job) continue;
    pending_.erase(k);
    ++withdrawn;
  }
  for (auto& w : workers_) {
    if (!w->claiming || w->exited) continue;
    for (std::size_t k = w->held.size(); k-- > 0;) {
      if (w->held[k].job.get() != &job || !w->claims.revoke(w->held[k].id)) continue;
      w->held.erase(k);
      ++withdrawn;
      if (k == 0) w->front_since = Clock::now();  // the next one's clock starts now, near enough
    }
  }
  if (withdrawn != 0) wake();  // a worker may now have nothing left to do
  return withdrawn;
}

PROCPOOL_ENGINE_INLINE bool Dispatcher::post_callback(std::function<void()> work) {
  try {
    runner_.post(std::move(work));
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

PROCPOOL_ENGINE_INLINE void Dispatcher::close() {
  require_owner();
  {
    std::lock_guard lock(mutex_);
    if (state_ == State::running) state_ = State::closed;
  }
  wake();
}

PROCPOOL_ENGINE_INLINE void Dispatcher::join() {
  require_owner();
  {
    std::lock_guard lock(mutex_);
    if (state_ == State::running) {
      throw PoolNotRunning("procpool: join() called on a running pool; call close() or terminate() first");
    }
  }
  {
    std::lock_guard join_lock(join_mutex_);
    thread_.join();
    // Every worker has exited: what they printed is in the relay's pipes.
    if (relay_) relay_->finish(std::chrono::seconds(1), std::chrono::seconds(5));
  }
  // And every callback has run (but the one calling join(), if one is).
  // Without the lock: a callback may call terminate() or join() meanwhile.
  runner_.drain();
}

PROCPOOL_ENGINE_INLINE void Dispatcher::terminate() noexcept {
  if (forked_copy()) return;
  terminated_.store(true, std::memory_order_relaxed);
  {
    std::lock_guard lock(mutex_);
    if (state_ != State::stopped) state_ = State::terminating;
  }
  wake();
  std::lock_guard join_lock(join_mutex_);
  thread_.join();
  stop_workers();
  if (relay_) relay_->finish(kill_grace, kill_grace);
}

}  // namespace procpool::detail

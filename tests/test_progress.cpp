// procpool::ProgressBar: what it draws, when, and that copies share one bar.
// Time comes from an injected fake clock and the text goes to a sink (or a
// temporary file), so every expected line is exact.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common.hpp"

namespace {

using namespace std::chrono_literals;
using TimePoint = std::chrono::steady_clock::time_point;

/// A clock that moves only when told, and a sink that keeps what is drawn.
struct Fixture {
  TimePoint now{};
  std::string out;

  procpool::ProgressBarOptions options(procpool::ProgressDraw draw = procpool::ProgressDraw::always) {
    return {.label = "work",
            .draw = draw,
            .sink = [this](std::string_view text) { out += text; },
            .clock = [this] { return now; }};
  }
};

std::size_t count(std::string_view text, char c) { return static_cast<std::size_t>(std::ranges::count(text, c)); }

/// The part of the output after the last '\r': the line now on the screen.
std::string screen(const std::string& out) {
  std::string line = out.substr(out.rfind('\r') + 1);
  while (!line.empty() && (line.back() == ' ' || line.back() == '\n')) line.pop_back();
  return line;
}

/// Everything written to a temporary FILE*.
std::string contents(std::FILE* file) {
  std::fflush(file);
  std::rewind(file);
  std::string text;
  for (int c; (c = std::fgetc(file)) != EOF;) text += static_cast<char>(c);
  return text;
}

}  // namespace

TEST_CASE("progress bar with a known total: count, percentage, rate, elapsed and ETA", "[progress]") {
  Fixture f;
  procpool::ProgressBar bar(f.options());
  f.now += 10s;
  bar(25, 100);
  CHECK(f.out == "\rwork:  25% [#######-----------------------] 25/100 | 2.5 items/s | 00:10 elapsed | ETA 00:30");
  CHECK(bar.line() == screen(f.out));
  CHECK(bar.live());
}

TEST_CASE("progress bar ETA and rate follow the injected clock", "[progress]") {
  Fixture f;
  procpool::ProgressBar bar(f.options());
  bar(0, 1000);  // nothing done yet: no rate, no ETA
  CHECK(screen(f.out) == "work:   0% [------------------------------] 0/1000 | ? items/s | 00:00 elapsed | ETA --:--");
  f.now += 1h + 2min + 5s;  // 3725 s
  bar(745, 1000);           // 0.2 items/s; 255 left take 1275 s
  CHECK(screen(f.out) ==
        "work:  74% [######################--------] 745/1000 | 0.2 items/s | 1:02:05 elapsed | ETA 21:15");
  f.now += 1275s;  // 5000 s, as the ETA said
  bar(1000, 1000);
  CHECK(screen(f.out) ==
        "work: 100% [##############################] 1000/1000 | 0.2 items/s | 1:23:20 elapsed | ETA 00:00");
}

TEST_CASE("progress bar with an unknown total shows count, rate and elapsed only", "[progress]") {
  Fixture f;
  procpool::ProgressBar bar(f.options());
  f.now += 4s;
  bar(42, std::nullopt);
  CHECK(screen(f.out) == "work: 42 | 10.5 items/s | 00:04 elapsed");
  CHECK(f.out.find('%') == std::string::npos);
  CHECK(f.out.find("ETA") == std::string::npos);
}

TEST_CASE("progress bar without a label starts with the bar", "[progress]") {
  Fixture f;
  auto options = f.options();
  options.label.clear();
  options.width = 10;
  procpool::ProgressBar bar(options);
  f.now += 2s;
  bar(5, 10);
  CHECK(screen(f.out) == " 50% [#####-----] 5/10 | 2.5 items/s | 00:02 elapsed | ETA 00:02");
}

TEST_CASE("progress bar redraws at most every min_interval, but always the final state", "[progress]") {
  Fixture f;
  procpool::ProgressBar bar(f.options());
  bar(1, 10);  // the first update draws
  CHECK(count(f.out, '\r') == 1);
  f.now += 50ms;
  bar(2, 10);  // too soon
  bar(3, 10);
  CHECK(count(f.out, '\r') == 1);
  f.now += 50ms;  // 100 ms after the last redraw
  bar(4, 10);
  CHECK(count(f.out, '\r') == 2);
  CHECK(screen(f.out).find(" 4/10 ") != std::string::npos);
  f.now += 10ms;
  bar(10, 10);  // complete: drawn at once
  CHECK(count(f.out, '\r') == 3);
  CHECK(screen(f.out).find(" 10/10 ") != std::string::npos);
  bar(10, 10);  // the same final state again: not redrawn
  CHECK(count(f.out, '\r') == 3);
  CHECK(count(f.out, '\n') == 0);
}

TEST_CASE("progress bar pads a redraw over a longer previous line", "[progress]") {
  Fixture f;
  procpool::ProgressBar bar(f.options());
  f.now += 1s;
  bar(123456, std::nullopt);  // "work: 123456 | 123456.0 items/s | 00:01 elapsed"
  const std::size_t first = f.out.size() - 1;
  f.now += 999s;
  bar(123457, std::nullopt);  // "work: 123457 | 123.5 items/s | 16:40 elapsed": 3 shorter
  const std::string second = f.out.substr(first + 1);
  CHECK(second.size() == first + 1);
  CHECK(second.ends_with("elapsed   "));
}

TEST_CASE("progress bar finish() draws the final state and one newline, once", "[progress]") {
  Fixture f;
  {
    procpool::ProgressBar bar(f.options());
    bar(3, 10);
    f.now += 10ms;
    bar(7, 10);  // throttled: the screen still says 3
    CHECK(screen(f.out).find(" 3/10 ") != std::string::npos);
    bar.finish();
    CHECK(screen(f.out).find(" 7/10 ") != std::string::npos);
    CHECK(f.out.ends_with("\n"));
    const std::string after_finish = f.out;
    bar.finish();
    f.now += 1s;
    bar(9, 10);  // after finish: ignored
    CHECK(f.out == after_finish);
    CHECK(bar.line().find(" 7/10 ") != std::string::npos);
  }
  CHECK(count(f.out, '\n') == 1);  // the destructor did not end the line again
  CHECK(count(f.out, '\r') == 2);
}

TEST_CASE("progress bar finish() without any update draws nothing", "[progress]") {
  Fixture f;
  procpool::ProgressBar bar(f.options());
  bar.finish();
  CHECK(f.out.empty());
}

TEST_CASE("progress bar copies share one bar, and the last copy's destructor finishes it", "[progress]") {
  Fixture f;
  std::optional<procpool::ProgressBar> bar(f.options());
  procpool::ProgressCallback callback = *bar;  // what a pool stores and calls
  callback(1, 4);
  CHECK(bar->line().find(" 1/4 ") != std::string::npos);
  f.now += 1s;
  callback(2, 4);
  CHECK(screen(f.out).find(" 2/4 ") != std::string::npos);
  f.now += 10ms;
  callback(3, 4);  // within min_interval of the copy's redraw: throttled for both
  CHECK(screen(f.out).find(" 2/4 ") != std::string::npos);
  bar.reset();  // not the last copy: nothing happens
  CHECK(count(f.out, '\n') == 0);
  callback = nullptr;  // the last one: finishes with the latest count
  CHECK(count(f.out, '\n') == 1);
  CHECK(screen(f.out).find(" 3/4 ") != std::string::npos);
}

TEST_CASE("progress bar finish() on one copy stops the others drawing", "[progress]") {
  Fixture f;
  procpool::ProgressBar bar(f.options());
  procpool::ProgressBar copy = bar;
  copy(1, 2);
  bar.finish();
  const std::string finished = f.out;
  f.now += 1s;
  copy(2, 2);
  copy.finish();
  CHECK(f.out == finished);
}

TEST_CASE("progress bar updates from several threads all land on one bar", "[progress]") {
  Fixture f;
  auto options = f.options();
  options.clock = [] { return TimePoint{}; };  // the fixture's clock is not shared between threads
  procpool::ProgressBar bar(options);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < 4; ++t) {
    threads.emplace_back([copy = bar] {
      for (std::size_t i = 0; i < 1000; ++i) copy(i, 1000);
    });
  }
  for (auto& thread : threads) thread.join();
  bar(1000, 1000);
  bar.finish();
  CHECK(count(f.out, '\n') == 1);
  CHECK(screen(f.out).find(" 1000/1000 ") != std::string::npos);
}

TEST_CASE("progress bar in automatic mode draws nothing when the output is not a terminal", "[progress]") {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::tmpfile(), std::fclose);
  REQUIRE(file);
  {
    procpool::ProgressBar bar({.label = "quiet", .output = file.get()});
    CHECK_FALSE(bar.live());
    bar(1, 2);
    bar(2, 2);
    bar.finish();
    CHECK(bar.line().starts_with("quiet: 100% "));  // it still counts
  }
  CHECK(contents(file.get()).empty());
}

TEST_CASE("progress bar in automatic mode with summary_when_not_terminal writes one final line", "[progress]") {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::tmpfile(), std::fclose);
  REQUIRE(file);
  {
    procpool::ProgressBar bar({.label = "logged", .output = file.get(), .summary_when_not_terminal = true});
    for (std::size_t i = 1; i <= 50; ++i) bar(i, 50);
  }  // finished by the destructor
  const std::string text = contents(file.get());
  CHECK(text.starts_with("logged: 100% [##############################] 50/50 | "));
  CHECK(count(text, '\n') == 1);
  CHECK(text.ends_with("\n"));
  CHECK(count(text, '\r') == 0);
}

TEST_CASE("progress bar in always mode draws into a file, never mode draws nothing", "[progress]") {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::tmpfile(), std::fclose);
  REQUIRE(file);
  {
    procpool::ProgressBar never({.draw = procpool::ProgressDraw::never, .output = file.get()});
    never(1, 1);
    never.finish();
  }
  CHECK(contents(file.get()).empty());
  {
    procpool::ProgressBar always({.label = "forced", .draw = procpool::ProgressDraw::always, .output = file.get()});
    always(1, 1);
    always.finish();
  }
  const std::string text = contents(file.get());
  CHECK(text.starts_with("\rforced: 100% "));
  CHECK(count(text, '\n') == 1);
}

TEST_CASE("progress bar destructor swallows a failing sink", "[progress]") {
  Fixture f;
  auto options = f.options();
  bool throw_now = false;
  options.sink = [&](std::string_view) {
    if (throw_now) throw std::runtime_error("sink broke");
  };
  auto bar = std::make_optional<procpool::ProgressBar>(options);
  (*bar)(1, 2);
  throw_now = true;
  f.now += 1s;
  CHECK_THROWS_AS((*bar)(2, 2), std::runtime_error);  // a live call reports it
  CHECK_NOTHROW(bar.reset());                         // the destructor does not
}

TEST_CASE("progress bar is a ProgressCallback and fits CallOptions", "[progress]") {
  Fixture f;
  procpool::ProgressBar bar(f.options());
  procpool::CallOptions call{.progress = bar};
  call.progress(5, std::nullopt);
  CHECK(screen(f.out) == "work: 5 | ? items/s | 00:00 elapsed");
}

TEST_CASE("progress bar follows an imap over a real pool", "[progress]") {
  Fixture f;
  procpool::ProgressBar bar(f.options());
  procpool::Pool pool(test::options<test::Fork>());
  const std::vector<long> xs = {1, 2, 3, 4, 5, 6, 7, 8};
  std::size_t done = 0;
  for (long v : pool.imap_unordered([](long x) { return x * x; }, xs)) {
    CHECK(v > 0);
    bar(++done, xs.size());
  }
  bar.finish();
  CHECK(screen(f.out).starts_with("work: 100% [##############################] 8/8 | "));
  CHECK(count(f.out, '\n') == 1);
}

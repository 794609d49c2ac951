// Going on past failures and catching what a task threw as its own type:
// IMap::results(), RemoteError::rethrow(), procpool::register_exception and
// Options::raise_original_exceptions; and progress that keeps to what the
// program sees: an imap's progress counts the items taken, and
// ProgressBar::println prints above a live bar.
#include <chrono>
#include <future>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "common.hpp"

namespace results_test {

using namespace std::chrono_literals;

struct ParseError : std::runtime_error {
  explicit ParseError(const std::string& what) : std::runtime_error(what) {}
};

struct Unregistered : std::runtime_error {
  using std::runtime_error::runtime_error;
};

long fail_on_odd(long x) {
  if (x % 2 != 0) throw std::invalid_argument("odd " + std::to_string(x));
  return x * 10;
}

long parse(long x) {
  if (x == 3) throw ParseError("line 3 is not a number");
  return x;
}

long unregistered(long x) {
  if (x == 1) throw Unregistered("nobody knows this one");
  return x;
}

long identity(long x) { return x; }

/// A result type whose load() throws something that is not a std::exception.
struct Touchy {
  long v = 0;
  template <class Archive>
  void serialize(Archive& archive) {
    archive(v);
    if (v == 17 && Archive::is_loading::value) throw 17;
  }
};

Touchy touchy(long x) { return Touchy{x}; }

using test::iota_vec;

}  // namespace results_test

namespace results_test {

POOL_TEST("a range-for over IMap::results() goes on past failed items", "[results]") {
  procpool::Pool pool(test::options<TestType>());
  SECTION("imap, an lvalue IMap") {
    auto it = pool.imap<fail_on_odd>(iota_vec(10));
    std::vector<long> values;
    std::vector<std::string> errors;
    for (const procpool::Result<long>& r : it.results()) {
      if (r) {
        values.push_back(*r);
      } else {
        errors.push_back(r.error_message());
        CHECK_THROWS_AS(r.value(), procpool::RemoteError);
        CHECK(r.error() != nullptr);
      }
    }
    CHECK(values == std::vector<long>{0, 20, 40, 60, 80});
    REQUIRE(errors.size() == 5);
    CHECK_THAT(errors[0], Catch::Contains("odd 1") && Catch::Contains("input #1"));
    CHECK_THAT(errors[4], Catch::Contains("odd 9"));
    CHECK_FALSE(it.next().has_value());
  }
  SECTION("imap_unordered, a temporary IMap the range keeps") {
    std::size_t ok = 0, failed = 0;
    for (auto r : pool.imap_unordered<fail_on_odd>(iota_vec(20), 3).results()) {
      if (r.ok()) {
        CHECK(*r % 20 == 0);
        ++ok;
      } else {
        ++failed;
      }
    }
    CHECK(ok == 10);
    CHECK(failed == 10);
  }
}

POOL_TEST("a result whose load() throws an int fails that item alone, in its place", "[results][errors]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<long> values;
  std::vector<std::string> errors;
  for (const procpool::Result<Touchy>& r : pool.imap<touchy>(iota_vec(20), 1).results()) {
    if (r) {
      values.push_back(r->v);
    } else {
      errors.push_back(r.error_message());
      values.push_back(-1);
    }
  }
  std::vector<long> expected = iota_vec(20);
  expected[17] = -1;
  CHECK(values == expected);
  REQUIRE(errors.size() == 1);
  CHECK_THAT(errors[0], Catch::Contains("input #17") && Catch::Contains("could not be decoded (int)"));
  std::string seen;
  auto async = pool.map_async<touchy>(iota_vec(20), 1, nullptr, [&seen](const procpool::Error& e) { seen = e.what(); });
  CHECK_THROWS_AS(async.get(), procpool::Error);
  CHECK_THAT(seen, Catch::Contains("input #17"));
}

POOL_TEST("RemoteError::rethrow raises a task's standard exception as its own type", "[results][errors]") {
  procpool::Pool pool(test::options<TestType>());
  try {
    pool.apply<fail_on_odd>(7L);
    FAIL("no exception");
  } catch (const procpool::RemoteError& e) {
    CHECK(e.type_name() == "std::invalid_argument");
    try {
      e.rethrow();
    } catch (const std::invalid_argument& original) {
      CHECK(std::string(original.what()) == "odd 7");
      try {
        std::rethrow_if_nested(original);
        FAIL("no RemoteError nested");
      } catch (const procpool::RemoteError& nested) {
        CHECK(nested.input_index() == 0);
        CHECK(nested.pid() > 0);
      }
    }
  }
  // A type procpool cannot make stays a RemoteError.
  try {
    pool.apply<unregistered>(1L);
    FAIL("no exception");
  } catch (const procpool::RemoteError& e) {
    CHECK_THAT(e.type_name(), Catch::Contains("Unregistered"));
    CHECK_THROWS_AS(e.rethrow(), procpool::RemoteError);
  }
}

POOL_TEST("register_exception lets a program's own exception type be raised again", "[results][errors]") {
  procpool::register_exception<ParseError>();
  procpool::Pool pool(test::options<TestType>());
  try {
    (void)pool.map<parse>(iota_vec(5), 1);
    FAIL("no exception");
  } catch (const procpool::RemoteError& e) {
    CHECK(e.input_index() == 3);
    CHECK_THROWS_AS(e.rethrow(), ParseError);
    CHECK_THROWS_WITH(e.rethrow(), "line 3 is not a number");
  }
}

POOL_TEST("raise_original_exceptions throws a task's exception as its own type", "[results][errors]") {
  procpool::register_exception<ParseError>();
  procpool::Pool pool(test::options<TestType>({.raise_original_exceptions = true}));
  CHECK_THROWS_AS(pool.apply<fail_on_odd>(3L), std::invalid_argument);
  CHECK_THROWS_AS(pool.map<parse>(iota_vec(5), 2), ParseError);
  CHECK_THROWS_AS(pool.apply_async<parse>(3L).get(), ParseError);
  try {
    (void)pool.map<fail_on_odd>(iota_vec(4), 1);
    FAIL("no exception");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()) == "odd 1");  // map throws its first failed item's error
    try {
      std::rethrow_if_nested(e);
    } catch (const procpool::RemoteError& nested) {
      CHECK(nested.input_index() == 1);
    }
  }
  std::size_t originals = 0;
  for (const auto& r : pool.imap<fail_on_odd>(iota_vec(6)).results()) {
    if (!r) CHECK_THROWS_AS(r.value(), std::invalid_argument);
    originals += !r;
  }
  CHECK(originals == 3);
  // Types procpool cannot make still arrive as RemoteError.
  CHECK_THROWS_AS(pool.apply<unregistered>(1L), procpool::RemoteError);
  // Results that did not fail are untouched.
  CHECK(pool.map<fail_on_odd>(std::vector<long>{0, 2}) == std::vector<long>{0, 20});
}

POOL_TEST("with raise_original_exceptions, error callbacks still get the RemoteError", "[results][errors][callbacks]") {
  procpool::Pool pool(test::options<TestType>({.raise_original_exceptions = true}));
  std::promise<std::size_t> map_index;
  auto r = pool.map_async<fail_on_odd>(iota_vec(4), 1, nullptr, [&](const procpool::Error& e) {
    const auto* remote = dynamic_cast<const procpool::RemoteError*>(&e);
    map_index.set_value(remote != nullptr ? remote->input_index() : 99);
  });
  auto index = map_index.get_future();
  REQUIRE(index.wait_for(30s) == std::future_status::ready);
  CHECK(index.get() == 1);
  CHECK_THROWS_AS(r.get(), std::invalid_argument);  // get() still throws the original type

  std::promise<std::string> apply_type;
  auto a = pool.apply_async<fail_on_odd>(5L, procpool::callbacks(nullptr, [&](const procpool::Error& e) {
                                           const auto* remote = dynamic_cast<const procpool::RemoteError*>(&e);
                                           apply_type.set_value(remote != nullptr ? remote->type_name() : "none");
                                         }));
  auto type = apply_type.get_future();
  REQUIRE(type.wait_for(30s) == std::future_status::ready);
  CHECK(type.get() == "std::invalid_argument");
  CHECK_THROWS_AS(a.get(), std::invalid_argument);
}

POOL_TEST("an imap's progress counts the items the loop has taken", "[results][progress]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<std::pair<std::size_t, std::optional<std::size_t>>> reports;
  const std::thread::id reader = std::this_thread::get_id();
  bool other_thread = false;
  auto progress = [&](std::size_t done, std::optional<std::size_t> total) {
    other_thread |= std::this_thread::get_id() != reader;
    reports.emplace_back(done, total);
  };
  auto it = pool.imap<identity>(iota_vec(20), {.chunksize = 2, .progress = progress});
  for (int i = 0; i < 5; ++i) REQUIRE(it.next().has_value());
  // Give the workers time to finish everything: the count stays at what was taken.
  std::this_thread::sleep_for(300ms);
  REQUIRE_FALSE(reports.empty());
  CHECK(reports.back().first == 5);
  CHECK(reports.back().second == std::optional<std::size_t>(20));
  while (it.next()) {
  }
  CHECK(reports.back().first == 20);
  CHECK(reports.size() == 20);
  CHECK_FALSE(other_thread);
}

TEST_CASE("ProgressBar::println prints a line above a live bar and draws the bar again", "[results][progress]") {
  std::string out;
  procpool::ProgressBar bar({.label = "work",
                             .draw = procpool::ProgressDraw::always,
                             .sink = [&](std::string_view text) { out += text; },
                             .clock = [] { return std::chrono::steady_clock::time_point{}; }});
  bar(5, 10);
  const std::string drawn = out;
  REQUIRE(drawn.starts_with("\rwork:  50%"));
  out.clear();
  bar.println("found 3 bad files");
  // Over the bar's line, blanked to its length; then a newline; then the bar below.
  const std::string padded = "found 3 bad files" + std::string(drawn.size() - 1 - 17, ' ');
  CHECK(out == "\r" + padded + "\n" + drawn);
  out.clear();
  bar.finish();
  out.clear();
  bar.println("done");
  CHECK(out == "done\n");
}

TEST_CASE("ProgressBar pads by characters, not bytes, over UTF-8 text", "[results][progress]") {
  std::string out;
  procpool::ProgressBar bar({.label = "fichiers traités",  // "é": 2 bytes, 1 column
                             .draw = procpool::ProgressDraw::always,
                             .sink = [&](std::string_view text) { out += text; },
                             .clock = [] { return std::chrono::steady_clock::time_point{}; }});
  bar(5, 10);
  const std::size_t bar_columns = out.size() - 1 - 1;  // no '\r'; one 2-byte character
  out.clear();
  bar.println("déjà vu");  // 9 bytes, 7 columns
  const std::string line = out.substr(0, out.find('\n'));
  // The whole bar is blanked: 7 columns of text, then spaces to the bar's width.
  CHECK(line == "\rdéjà vu" + std::string(bar_columns - 7, ' '));
}

TEST_CASE("ProgressBar::println without a live bar just prints the line", "[results][progress]") {
  std::string out;
  procpool::ProgressBar bar(
      {.draw = procpool::ProgressDraw::never, .sink = [&](std::string_view text) { out += text; }});
  bar(1, 2);
  bar.println("a line");
  CHECK(out == "a line\n");
}

TEST_CASE("Result refuses an empty error, and a results() range is not copied", "[results]") {
  CHECK_THROWS_AS(procpool::Result<long>(std::exception_ptr{}), std::invalid_argument);
  const procpool::Result<std::string> ok(std::string("x"));
  CHECK(ok->size() == 1);
  using Range = decltype(std::declval<procpool::IMap<long>&>().results());
  // Its iterators point into it: a copy would yield the current item twice.
  STATIC_REQUIRE_FALSE(std::is_copy_constructible_v<Range>);
  STATIC_REQUIRE_FALSE(std::is_move_constructible_v<Range>);
}

TEST_CASE("two exception types of one name are raised as neither", "[results][errors]") {
  auto& types = procpool::detail::ExceptionTypes::instance();
  auto maker = &procpool::detail::throw_nested_as<std::runtime_error>;
  types.add("results_test::Twice", typeid(int), maker);
  CHECK(types.find("results_test::Twice") == maker);
  types.add("results_test::Twice", typeid(int), maker);  // the same type again: still known
  CHECK(types.find("results_test::Twice") == maker);
  types.add("results_test::Twice", typeid(long), maker);  // another type of that name
  CHECK(types.find("results_test::Twice") == nullptr);
}

}  // namespace results_test

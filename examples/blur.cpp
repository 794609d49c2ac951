// blur: blurs a large grayscale image (3x3 box blur) in bands of rows on a
// procpool::Pool, twice: with the image in procpool::SharedMemory, where
// every task reads the one input block and writes its rows of the one output
// block in place, and with each band copied to its worker as a std::vector
// and back. Shows SharedMemory: workers writing disjoint parts of a shared
// block, nothing copied but a few bytes of reference per task.
//
//   ./blur [SIDE] [--processes P]     SIDE (pixels) defaults to 6000, P to the CPU count
//
// Prints the three timings and "same as serial: ok" when both pool results
// match the serial blur byte for byte; exits 1 otherwise, 2 on a bad argument.
//
// A box blur does little work per byte: copying a band to a worker and its
// result back costs about as much as blurring it, so the copying version is
// often no faster than serial, or slower. That is the point of the example:
// for cheap work on large data, share the memory instead of sending it.
#include <procpool/procpool.hpp>

#include <fmt/core.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <tuple>
#include <vector>

namespace {

// Blurs rows [first, last) of a side x side image: each output pixel is the
// mean of the 3x3 pixels around it (clamped at the edges). `in` holds the
// image's rows from `in_first` on.
void blur_rows(std::span<const std::uint8_t> in, std::size_t in_first, std::span<std::uint8_t> out, std::size_t side,
               std::size_t first, std::size_t last) {
  auto at = [&](std::size_t row, std::size_t col) -> unsigned { return in[(row - in_first) * side + col]; };
  for (std::size_t row = first; row < last; ++row) {
    const std::size_t up = row == 0 ? 0 : row - 1, down = std::min(row + 1, side - 1);
    for (std::size_t col = 0; col < side; ++col) {
      const std::size_t left = col == 0 ? 0 : col - 1, right = std::min(col + 1, side - 1);
      unsigned sum = 0;
      for (std::size_t r : {up, row, down}) sum += at(r, left) + at(r, col) + at(r, right);
      out[(row - first) * side + col] = static_cast<std::uint8_t>(sum / 9);
    }
  }
}

// A task of the shared version: reads the whole input block, writes its own
// rows of the output block. Returns how many rows it wrote.
std::size_t blur_band_shared(procpool::SharedMemory in, procpool::SharedMemory out, std::size_t side, std::size_t first,
                             std::size_t last) {
  blur_rows(in.as<const std::uint8_t>(), 0, out.as<std::uint8_t>().subspan(first * side, (last - first) * side), side,
            first, last);
  return last - first;
}

// A task of the copying version: gets its rows with one row of margin on
// each side (rows [in_first, ...)), returns its blurred rows.
std::vector<std::uint8_t> blur_band_copied(std::vector<std::uint8_t> rows, std::size_t in_first, std::size_t side,
                                           std::size_t first, std::size_t last) {
  std::vector<std::uint8_t> out((last - first) * side);
  blur_rows(rows, in_first, out, side, first, last);
  return out;
}

template <class T>
bool parse_number(std::string_view text, T& value) {
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc{} && end == text.data() + text.size();
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);

  std::size_t side = 6000;
  std::size_t processes = 0;  // 0: one worker per CPU
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    bool ok = false;
    if (arg == "--processes" && i + 1 < argc) {
      ok = parse_number(argv[++i], processes);
    } else {
      ok = parse_number(arg, side) && side >= 3;
    }
    if (!ok) {
      fmt::print(stderr, "usage: {} [SIDE >= 3] [--processes P]\n", argv[0]);
      return 2;
    }
  }

  // A made-up image: stripes and a gradient, the same on every run.
  procpool::SharedMemory image(side * side);
  auto pixels = image.as<std::uint8_t>();
  for (std::size_t row = 0; row < side; ++row) {
    for (std::size_t col = 0; col < side; ++col) {
      pixels[row * side + col] = static_cast<std::uint8_t>((row * 7 + col * 3) ^ (col / 16 % 2 ? 0xff : 0));
    }
  }

  auto start = std::chrono::steady_clock::now();
  std::vector<std::uint8_t> serial(side * side);
  blur_rows(pixels, 0, serial, side, 0, side);
  const double serial_time = seconds_since(start);

  procpool::Pool pool({.processes = processes});
  // Several bands per worker, so the workers finish together.
  const std::size_t bands = std::min(side, 4 * pool.processes());
  std::vector<std::pair<std::size_t, std::size_t>> rows;
  for (std::size_t b = 0; b < bands; ++b) rows.emplace_back(side * b / bands, side * (b + 1) / bands);

  procpool::SharedMemory blurred(side * side);
  // Start the workers before the clock (row 0, which the timed run writes again).
  pool.apply<blur_band_shared>(image, blurred, side, std::size_t{0}, std::size_t{1});

  // Shared: every task gets the two blocks (a reference each) and its rows.
  start = std::chrono::steady_clock::now();
  std::vector<std::tuple<procpool::SharedMemory, procpool::SharedMemory, std::size_t, std::size_t, std::size_t>>
      shared_tasks;
  for (auto [first, last] : rows) shared_tasks.emplace_back(image, blurred, side, first, last);
  std::vector<std::size_t> written = pool.starmap<blur_band_shared>(shared_tasks, 1);
  const double shared_time = seconds_since(start);

  // Copied: every task gets its rows (and a margin) and returns its band.
  start = std::chrono::steady_clock::now();
  std::vector<std::tuple<std::vector<std::uint8_t>, std::size_t, std::size_t, std::size_t, std::size_t>> copied_tasks;
  for (auto [first, last] : rows) {
    const std::size_t in_first = first == 0 ? 0 : first - 1, in_last = std::min(last + 1, side);
    copied_tasks.emplace_back(std::vector<std::uint8_t>(pixels.begin() + in_first * side,
                                                        pixels.begin() + in_last * side),
                              in_first, side, first, last);
  }
  std::vector<std::vector<std::uint8_t>> bands_back = pool.starmap<blur_band_copied>(copied_tasks, 1);
  std::vector<std::uint8_t> copied;
  copied.reserve(side * side);
  for (const auto& band : bands_back) copied.insert(copied.end(), band.begin(), band.end());
  const double copied_time = seconds_since(start);

  std::size_t rows_written = 0;
  for (std::size_t n : written) rows_written += n;
  const bool shared_ok = rows_written == side && std::memcmp(blurred.data(), serial.data(), serial.size()) == 0;
  const bool copied_ok = copied == serial;

  fmt::print("blurred a {}x{} image ({:.1f} MiB) in {} bands on {} workers\n", side, side,
             static_cast<double>(side * side) / (1 << 20), bands, pool.processes());
  fmt::print("serial:                  {:.3f} s\n", serial_time);
  fmt::print("pool, SharedMemory:      {:.3f} s  ({:.2f}x serial)\n", shared_time, serial_time / shared_time);
  fmt::print("pool, bands copied:      {:.3f} s  ({:.2f}x serial)\n", copied_time, serial_time / copied_time);
  fmt::print("(copying each band there and back costs about as much as blurring it: shared memory avoids that)\n");
  if (!shared_ok || !copied_ok) {
    fmt::print(stderr, "error: the pool's blur differs from the serial one (shared {}, copied {})\n",
               shared_ok ? "same" : "different", copied_ok ? "same" : "different");
    return 1;
  }
  fmt::print("same as serial: ok\n");
  return 0;
}

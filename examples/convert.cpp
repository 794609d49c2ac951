// convert: a batch image converter. Every file in an input folder is read
// as a Netpbm image (PGM or PPM: P2, P3, P5, P6, 8 or 16 bits), turned to
// grayscale, inverted and halved in size, and written to an output folder
// as a binary PGM, one file per worker task. Shows imap_unordered over a
// list of jobs with a struct as argument and as result, per-file errors
// that come back as procpool::RemoteError (the file is named through
// input_index()) while the other files go on, and no extra dependencies:
// the Netpbm formats are simple enough to parse here.
//
//   ./convert INPUT_DIR OUTPUT_DIR [--processes P]
//   ./convert [--keep] [--processes P]
//
// Without folders it first writes sample images (and two broken files, to
// show the per-file errors) to a temporary folder, converts those, and
// removes the folder at the end unless --keep is given. View the results
// with any image viewer (e.g. `display`, `feh`, GIMP). Prints one line per
// file and a totals line "converted=N failed=M ...". A file that cannot be
// converted is reported and skipped and does not change the exit status;
// exits 1 if a folder cannot be read or made, 2 on a bad argument.
#include <procpool/procpool.hpp>

#include <fmt/core.h>

#include <stdlib.h>

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace fs = std::filesystem;

namespace {

// One file to convert: what travels to the worker.
struct Job {
  std::string input;
  std::string output;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(input, output);
  }
};

// What comes back: enough for the report line. imap_unordered yields values
// in completion order without their input's position, so the result names
// its file itself.
struct Converted {
  std::string input, output;
  std::string format;  // e.g. "P6 RGB 8-bit"
  std::uint64_t width = 0, height = 0, out_width = 0, out_height = 0;
  std::uint64_t bytes_in = 0, bytes_out = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(input, output, format, width, height, out_width, out_height, bytes_in, bytes_out);
  }
};

// Limits that turn a lying header into an error instead of a huge allocation.
constexpr std::uint64_t max_file_bytes = std::uint64_t{1} << 30;
constexpr std::uint64_t max_pixels = std::uint64_t{1} << 28;

std::string read_file(const std::string& path) {
  std::error_code ec;
  const std::uintmax_t size = fs::file_size(path, ec);
  if (ec) throw std::runtime_error(fmt::format("cannot read it: {}", ec.message()));
  if (size > max_file_bytes) throw std::runtime_error(fmt::format("{} bytes is over the 1 GiB limit", size));
  std::ifstream in(path, std::ios::binary);
  std::string data(static_cast<std::size_t>(size), '\0');
  if (!in.read(data.data(), static_cast<std::streamsize>(size))) throw std::runtime_error("cannot read it");
  return data;
}

// Reads a Netpbm file's header and samples; see `man 5 ppm` and `man 5 pgm`.
class PnmReader {
 public:
  explicit PnmReader(std::string_view data) : data_(data) {}

  // Whitespace and '#' comments may sit between any two header fields.
  void skip_space() {
    while (pos_ < data_.size()) {
      if (data_[pos_] == '#') {
        while (pos_ < data_.size() && data_[pos_] != '\n') ++pos_;
      } else if (is_space(data_[pos_])) {
        ++pos_;
      } else {
        break;
      }
    }
  }

  bool at_end() {
    skip_space();
    return pos_ == data_.size();
  }

  std::uint64_t number(std::string_view what) {
    skip_space();
    std::uint64_t value = 0;
    auto [end, error] = std::from_chars(data_.data() + pos_, data_.data() + data_.size(), value);
    if (error != std::errc{} || value > 1'000'000'000) {
      throw std::runtime_error(fmt::format("bad header: expected {} at byte {}", what, pos_));
    }
    pos_ = static_cast<std::size_t>(end - data_.data());
    return value;
  }

  // Binary formats: one whitespace character, then the raster.
  std::string_view raster() {
    if (pos_ >= data_.size() || !is_space(data_[pos_])) {
      throw std::runtime_error(fmt::format("bad header: no whitespace after maxval at byte {}", pos_));
    }
    return data_.substr(pos_ + 1);
  }

 private:
  static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
  std::string_view data_;
  std::size_t pos_ = 0;
};

struct Gray {
  std::uint64_t width = 0, height = 0;
  std::vector<std::uint8_t> pixels;  // row by row, 0 black .. 255 white
};

// Decodes any of P2, P3, P5, P6 into 8-bit gray; `format` receives a description.
Gray decode_pnm(std::string_view data, std::string& format) {
  if (data.size() < 2 || data[0] != 'P' || (data[1] != '2' && data[1] != '3' && data[1] != '5' && data[1] != '6')) {
    throw std::runtime_error("not a Netpbm image: it does not start with P2, P3, P5 or P6");
  }
  const bool binary = data[1] == '5' || data[1] == '6';
  const std::uint64_t channels = (data[1] == '3' || data[1] == '6') ? 3 : 1;
  PnmReader reader(data.substr(2));
  Gray image;
  image.width = reader.number("the width");
  image.height = reader.number("the height");
  const std::uint64_t maxval = reader.number("maxval");
  if (image.width == 0 || image.height == 0) throw std::runtime_error("bad header: the image is empty");
  if (image.width * image.height > max_pixels) {
    throw std::runtime_error(fmt::format("{}x{} is over the {} pixel limit", image.width, image.height, max_pixels));
  }
  if (maxval == 0 || maxval > 65535) throw std::runtime_error(fmt::format("bad header: maxval {}", maxval));
  format = fmt::format("P{} {} {}-bit", data[1], channels == 3 ? "RGB" : "gray", maxval < 256 ? 8 : 16);

  const std::uint64_t samples = image.width * image.height * channels;
  std::vector<std::uint32_t> values(static_cast<std::size_t>(samples));
  if (binary) {
    const std::string_view raster = reader.raster();
    const std::uint64_t bytes_per_sample = maxval < 256 ? 1 : 2;
    if (raster.size() < samples * bytes_per_sample) {
      throw std::runtime_error(fmt::format("truncated: a {}x{} image needs {} bytes of pixels, the file has {}",
                                           image.width, image.height, samples * bytes_per_sample, raster.size()));
    }
    for (std::size_t i = 0; i < values.size(); ++i) {
      const auto byte = [&](std::size_t k) {
        return static_cast<std::uint32_t>(static_cast<unsigned char>(raster[k]));
      };
      values[i] = bytes_per_sample == 1 ? byte(i) : (byte(2 * i) << 8) | byte(2 * i + 1);  // 16-bit: big-endian
    }
  } else {
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (reader.at_end()) throw std::runtime_error(fmt::format("truncated: {} of {} samples", i, samples));
      values[i] = static_cast<std::uint32_t>(reader.number("a sample"));
    }
  }

  image.pixels.resize(static_cast<std::size_t>(image.width * image.height));
  for (std::size_t p = 0; p < image.pixels.size(); ++p) {
    std::uint64_t level = values[p * channels];
    // Rec. 601 luma, the weights Netpbm's own ppmtopgm uses.
    if (channels == 3) level = (299 * values[3 * p] + 587 * values[3 * p + 1] + 114 * values[3 * p + 2]) / 1000;
    if (level > maxval) throw std::runtime_error(fmt::format("sample {} is over maxval {}", level, maxval));
    image.pixels[p] = static_cast<std::uint8_t>((level * 255 + maxval / 2) / maxval);
  }
  return image;
}

// Inverted, and half the size: each output pixel averages a 2x2 block
// (fewer at an odd right or bottom edge).
Gray invert_and_halve(const Gray& in) {
  Gray out;
  out.width = (in.width + 1) / 2;
  out.height = (in.height + 1) / 2;
  out.pixels.resize(static_cast<std::size_t>(out.width * out.height));
  for (std::uint64_t y = 0; y < out.height; ++y) {
    for (std::uint64_t x = 0; x < out.width; ++x) {
      std::uint64_t sum = 0, count = 0;
      for (std::uint64_t sy = 2 * y; sy < std::min(2 * y + 2, in.height); ++sy) {
        for (std::uint64_t sx = 2 * x; sx < std::min(2 * x + 2, in.width); ++sx) {
          sum += in.pixels[static_cast<std::size_t>(sy * in.width + sx)];
          ++count;
        }
      }
      out.pixels[static_cast<std::size_t>(y * out.width + x)] = static_cast<std::uint8_t>(255 - sum / count);
    }
  }
  return out;
}

std::string encode_pgm(const Gray& image) {
  std::string data = fmt::format("P5\n{} {}\n255\n", image.width, image.height);
  data.append(image.pixels.begin(), image.pixels.end());
  return data;
}

void write_file(const std::string& path, std::string_view data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  out.close();
  if (!out) throw std::runtime_error(fmt::format("cannot write {}", path));
}

// Runs in a worker. Throws with a message about the file; the parent adds its name.
Converted convert_file(const Job& job) {
  const std::string data = read_file(job.input);
  Converted result;
  result.input = job.input;
  result.output = job.output;
  const Gray image = decode_pnm(data, result.format);
  const Gray small = invert_and_halve(image);
  const std::string encoded = encode_pgm(small);
  write_file(job.output, encoded);
  result.width = image.width;
  result.height = image.height;
  result.out_width = small.width;
  result.out_height = small.height;
  result.bytes_in = data.size();
  result.bytes_out = encoded.size();
  return result;
}

// ---- sample inputs ------------------------------------------------------------

// A binary (P5/P6) or plain (P2/P3) image from a function of (x, y, channel).
template <class Sample>
std::string make_pnm(char kind, std::uint64_t width, std::uint64_t height, std::uint64_t maxval, Sample sample) {
  const std::uint64_t channels = (kind == '3' || kind == '6') ? 3 : 1;
  const bool binary = kind == '5' || kind == '6';
  std::string data = fmt::format("P{}\n# made by procpool's convert example\n{} {}\n{}\n", kind, width, height, maxval);
  for (std::uint64_t y = 0; y < height; ++y) {
    for (std::uint64_t x = 0; x < width; ++x) {
      for (std::uint64_t c = 0; c < channels; ++c) {
        const std::uint64_t v = sample(x, y, c) % (maxval + 1);
        if (!binary) {
          data += fmt::format("{} ", v);
        } else if (maxval > 255) {
          data += static_cast<char>(v >> 8);
          data += static_cast<char>(v & 0xff);
        } else {
          data += static_cast<char>(v);
        }
      }
      if (!binary && x + 1 == width) data += '\n';
    }
  }
  return data;
}

void write_samples(const fs::path& dir) {
  fs::create_directories(dir);
  const auto put = [&](const char* name, std::string_view data) { write_file((dir / name).string(), data); };
  put("gradient.pgm", make_pnm('5', 256, 128, 255, [](auto x, auto, auto) { return x; }));
  put("checker.ppm", make_pnm('6', 200, 150, 255, [](auto x, auto y, auto c) {
        return ((x / 25 + y / 25) % 2 == 0) ? 40 + 80 * c : 250 - 60 * c;
      }));
  put("circle.pgm", make_pnm('2', 64, 64, 15, [](auto x, auto y, auto) {
        const auto dx = static_cast<long>(x) - 32, dy = static_cast<long>(y) - 32;
        return dx * dx + dy * dy < 400 ? 15u : 2u;
      }));
  put("rainbow.ppm", make_pnm('3', 48, 32, 255, [](auto x, auto y, auto c) { return (x * 5 + y * 3 + c * 85) % 256; }));
  put("deep16.pgm", make_pnm('5', 120, 80, 65535, [](auto x, auto y, auto) { return x * 500 + y * 60; }));
  put("large.ppm", make_pnm('6', 1024, 768, 255, [](auto x, auto y, auto c) { return (x ^ y) + 40 * c; }));
  // Two files that must fail, each with its own message.
  put("notes.txt", "These are not pixels.\n");
  put("truncated.ppm", make_pnm('6', 64, 64, 255, [](auto x, auto, auto) { return x; }).substr(0, 120));
}

// ---- the parent ------------------------------------------------------------------

template <class T>
bool parse_number(std::string_view text, T& value) {
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc{} && end == text.data() + text.size();
}

// Every regular file in `input`, by name, each with its output path: the
// name with its extension replaced by .pgm, or with .pgm added if two
// inputs would share a name (a.ppm and a.pgm).
std::vector<Job> plan(const fs::path& input, const fs::path& output) {
  std::vector<fs::path> files;
  for (const fs::directory_entry& entry : fs::directory_iterator(input)) {
    if (entry.is_regular_file()) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  std::map<std::string, std::size_t> stems;
  for (const fs::path& file : files) ++stems[file.stem().string()];
  std::vector<Job> jobs;
  for (const fs::path& file : files) {
    const std::string name =
        stems[file.stem().string()] > 1 ? file.filename().string() + ".pgm" : file.stem().string() + ".pgm";
    jobs.push_back({file.string(), (output / name).string()});
  }
  return jobs;
}

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);

  std::vector<std::string> folders;
  bool keep = false;
  std::size_t processes = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--keep") {
      keep = true;
    } else if (arg == "--processes" && i + 1 < argc && parse_number(argv[i + 1], processes)) {
      ++i;
    } else if (!arg.starts_with("-")) {
      folders.emplace_back(arg);
    } else {
      folders.assign(3, "");  // shows the usage below
    }
  }
  if (folders.size() == 1 || folders.size() > 2) {
    fmt::print(stderr, "usage: {0} INPUT_DIR OUTPUT_DIR [--processes P]\n       {0} [--keep] [--processes P]\n",
               argv[0]);
    return 2;
  }

  fs::path input, output, sample_dir;
  try {
    if (folders.empty()) {
      std::string pattern = (fs::temp_directory_path() / "procpool-convert-XXXXXX").string();
      if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("cannot make a temporary folder");
      sample_dir = pattern;
      input = sample_dir / "in";
      output = sample_dir / "out";
      write_samples(input);
      fmt::print("sample images written to {}\n", input.string());
    } else {
      input = folders[0];
      output = folders[1];
    }
    fs::create_directories(output);
  } catch (const std::exception& e) {
    fmt::print(stderr, "convert: {}\n", e.what());
    return 1;
  }

  std::vector<Job> jobs;
  try {
    jobs = plan(input, output);
  } catch (const fs::filesystem_error& e) {
    fmt::print(stderr, "convert: cannot list {}: {}\n", input.string(), e.code().message());
    return 1;
  }

  procpool::Pool pool({.processes = processes});
  std::size_t converted = 0, failed = 0;
  std::uint64_t bytes_in = 0, bytes_out = 0;
  const auto name = [&](std::size_t index) { return fs::path(jobs.at(index).input).filename().string(); };
  // Files finish in any order; a value names its file itself and an error
  // through input_index(). A failed file throws from next() and is consumed;
  // the loop goes on with the rest.
  auto results = pool.imap_unordered<convert_file>(jobs);
  while (true) {
    try {
      std::optional<Converted> result = results.next();
      if (!result) break;
      fmt::print("  ok      {:<16} {:<16} {:>4}x{:<4} -> {}, {}x{}\n", fs::path(result->input).filename().string(),
                 result->format, result->width, result->height, fs::path(result->output).filename().string(),
                 result->out_width, result->out_height);
      ++converted;
      bytes_in += result->bytes_in;
      bytes_out += result->bytes_out;
    } catch (const procpool::RemoteError& e) {
      fmt::print("  FAILED  {}: {}\n", name(e.input_index()), e.message());
      ++failed;
    } catch (const procpool::WorkerLost& e) {
      fmt::print("  FAILED  {}: the converter crashed: {}\n", name(e.input_index()), e.what());
      ++failed;
    }
  }

  const bool removing = !sample_dir.empty() && !keep;
  fmt::print("converted={} failed={} of {} files, {} bytes read, {} bytes written{}\n", converted, failed, jobs.size(),
             bytes_in, bytes_out, removing ? "" : " to " + output.string());
  if (removing) {
    std::error_code ignored;
    fs::remove_all(sample_dir, ignored);
    fmt::print("removed the samples and their conversions (--keep keeps them)\n");
  } else if (!sample_dir.empty()) {
    fmt::print("kept the samples and their conversions in {}\n", sample_dir.string());
  }
  return 0;
}

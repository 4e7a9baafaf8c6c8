#include "worker/modelio/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>
#include <unordered_set>
#include <utility>

#include <nlohmann/json.hpp>

#include "ftune/file_util.h"

namespace ftune::trainer {
namespace {

using Json = nlohmann::json;

struct DtypeEntry {
  Dtype dtype;
  std::string_view name;
  int bits;
};

// Indexed by the enum's value.
constexpr DtypeEntry kDtypes[] = {
    {Dtype::kBool, "BOOL", 8},      {Dtype::kF4, "F4", 4},
    {Dtype::kF6E2M3, "F6_E2M3", 6}, {Dtype::kF6E3M2, "F6_E3M2", 6},
    {Dtype::kU8, "U8", 8},          {Dtype::kI8, "I8", 8},
    {Dtype::kF8E5M2, "F8_E5M2", 8}, {Dtype::kF8E4M3, "F8_E4M3", 8},
    {Dtype::kF8E8M0, "F8_E8M0", 8}, {Dtype::kI16, "I16", 16},
    {Dtype::kU16, "U16", 16},       {Dtype::kF16, "F16", 16},
    {Dtype::kBF16, "BF16", 16},     {Dtype::kI32, "I32", 32},
    {Dtype::kU32, "U32", 32},       {Dtype::kF32, "F32", 32},
    {Dtype::kC64, "C64", 64},       {Dtype::kF64, "F64", 64},
    {Dtype::kI64, "I64", 64},       {Dtype::kU64, "U64", 64},
};

std::string Quote(std::string_view s) {
  std::string out = "'";
  out.append(s.data(), s.size());
  out += "'";
  return out;
}

// A JSON value for an error message, cut short: a hostile header may hold
// megabytes in one value.
std::string Brief(const Json& value) {
  std::string s = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

std::string Range(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// Parses JSON and refuses an object that repeats a key, at any depth:
// nlohmann (like serde) would otherwise keep one of the two silently.
Result<Json> ParseJsonNoDuplicateKeys(std::string_view text, std::string_view source,
                                      std::string_view what) {
  std::vector<std::unordered_set<std::string>> open_objects;
  std::string duplicate;
  auto callback = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case Json::parse_event_t::key:
        if (!open_objects.empty() && parsed.is_string() &&
            !open_objects.back().insert(parsed.get_ref<const std::string&>()).second &&
            duplicate.empty()) {
          duplicate = parsed.get_ref<const std::string&>();
        }
        break;
      default:
        break;
    }
    return true;
  };
  Json j;
  try {
    j = Json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true);
  } catch (const Json::exception& e) {
    return DataLossError(std::string(source) + ": " + std::string(what) +
                         " is not valid JSON: " + e.what());
  }
  if (!duplicate.empty()) {
    return DataLossError(std::string(source) + ": " + std::string(what) + " has the key " +
                         Quote(duplicate) +
                         " twice (refused: which one is meant is ambiguous; the reference "
                         "implementation keeps one silently)");
  }
  return j;
}

bool GetU64(const Json& v, uint64_t* out) {
  if (!v.is_number_unsigned()) return false;
  *out = v.get<uint64_t>();
  return true;
}

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

// Validates one tensor entry of the header into *info (name set by caller).
Status ParseTensorEntry(const std::string& name, const Json& entry, std::string_view source,
                        uint64_t data_bytes, TensorInfo* info) {
  const std::string where = std::string(source) + ": tensor " + Quote(name) + ": ";
  if (!entry.is_object()) {
    return DataLossError(where + "entry must be an object with dtype, shape and data_offsets, got " +
                         Brief(entry));
  }
  const auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end()) return DataLossError(where + "missing \"dtype\"");
  if (!dtype_it->is_string()) {
    return DataLossError(where + "dtype must be a string, got " + Brief(*dtype_it));
  }
  const std::optional<Dtype> dtype = DtypeFromName(dtype_it->get_ref<const std::string&>());
  if (!dtype) return DataLossError(where + "unknown dtype " + Brief(*dtype_it));
  info->dtype = *dtype;

  const auto shape_it = entry.find("shape");
  if (shape_it == entry.end()) return DataLossError(where + "missing \"shape\"");
  if (!shape_it->is_array()) {
    return DataLossError(where + "shape must be an array of non-negative integers, got " +
                         Brief(*shape_it));
  }
  info->shape.clear();
  info->shape.reserve(shape_it->size());
  for (const Json& d : *shape_it) {
    uint64_t dim = 0;
    if (!GetU64(d, &dim)) {
      return DataLossError(where + "shape must be an array of non-negative integers, got " +
                           Brief(*shape_it));
    }
    info->shape.push_back(dim);
  }

  const auto off_it = entry.find("data_offsets");
  if (off_it == entry.end()) return DataLossError(where + "missing \"data_offsets\"");
  if (!off_it->is_array() || off_it->size() != 2 || !GetU64((*off_it)[0], &info->begin) ||
      !GetU64((*off_it)[1], &info->end)) {
    return DataLossError(where + "data_offsets must be [begin, end] of non-negative integers, got " +
                         Brief(*off_it));
  }
  if (info->begin > info->end) {
    return DataLossError(where + "data_offsets " + Range(info->begin, info->end) +
                         " have begin > end");
  }

  uint64_t elements = 1;
  for (uint64_t d : info->shape) {
    if (MulOverflows(elements, d, &elements)) {
      return DataLossError(where + "shape " + ShapeToString(info->shape) +
                           " has more elements than fit in 64 bits");
    }
  }
  uint64_t bits = 0;
  if (MulOverflows(elements, static_cast<uint64_t>(DtypeBits(info->dtype)), &bits)) {
    return DataLossError(where + std::string(DtypeName(info->dtype)) + " x " +
                         ShapeToString(info->shape) + " is larger than fits in 64 bits");
  }
  if (bits % 8 != 0) {
    return DataLossError(where + std::to_string(elements) + " elements of " +
                         std::string(DtypeName(info->dtype)) + " do not fill whole bytes");
  }
  if (info->end - info->begin != bits / 8) {
    return DataLossError(where + "data_offsets " + Range(info->begin, info->end) + " hold " +
                         std::to_string(info->end - info->begin) + " bytes but " +
                         std::string(DtypeName(info->dtype)) + " x " +
                         ShapeToString(info->shape) + " needs " + std::to_string(bits / 8) +
                         " bytes");
  }
  if (info->end > data_bytes) {
    return DataLossError(where + "data_offsets " + Range(info->begin, info->end) +
                         " extend past the end of the data buffer (" +
                         std::to_string(data_bytes) + " bytes)");
  }
  return OkStatus();
}

}  // namespace

std::string_view DtypeName(Dtype dtype) { return kDtypes[static_cast<size_t>(dtype)].name; }

std::optional<Dtype> DtypeFromName(std::string_view name) {
  for (const DtypeEntry& e : kDtypes) {
    if (e.name == name) return e.dtype;
  }
  return std::nullopt;
}

int DtypeBits(Dtype dtype) { return kDtypes[static_cast<size_t>(dtype)].bits; }

uint64_t TensorInfo::num_elements() const {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;
  return n;
}

std::string ShapeToString(const std::vector<uint64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  out += "]";
  return out;
}

Result<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* file, uint64_t file_size,
                                                 std::string_view source) {
  const std::string src(source);
  if (file_size < 8) {
    return DataLossError(src + ": file is " + std::to_string(file_size) +
                         " bytes, too short for the 8-byte header length");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | file[i];  // little-endian
  if (n > kMaxSafetensorsHeaderBytes) {
    return DataLossError(src + ": header length " + std::to_string(n) + " exceeds the limit of " +
                         std::to_string(kMaxSafetensorsHeaderBytes) + " bytes");
  }
  if (n > file_size - 8) {
    return DataLossError(src + ": header length " + std::to_string(n) +
                         " is larger than the file allows (file is " + std::to_string(file_size) +
                         " bytes, so at most " + std::to_string(file_size - 8) + ")");
  }
  if (n == 0 || file[8] != '{') {
    return DataLossError(src + ": header does not start with '{' (" +
                         (n == 0 ? std::string("it is empty")
                                 : "first byte is " + std::to_string(file[8])) +
                         "); stricter than the reference implementation, as the format "
                         "requires");
  }
  const std::string_view text(reinterpret_cast<const char*>(file + 8), n);
  FTUNE_ASSIGN_OR_RETURN(Json j, ParseJsonNoDuplicateKeys(text, source, "header"));
  if (!j.is_object()) {
    return DataLossError(src + ": header is not a JSON object");
  }

  SafetensorsHeader header;
  header.header_bytes = n;
  header.data_bytes = file_size - 8 - n;
  header.tensors.reserve(j.size());
  for (const auto& [key, value] : j.items()) {
    if (key == "__metadata__") {
      if (value.is_null()) continue;  // serde's Option: null is "no metadata"
      if (!value.is_object()) {
        return DataLossError(src + ": __metadata__ must be an object of strings, got " +
                             Brief(value));
      }
      for (const auto& [mkey, mvalue] : value.items()) {
        if (!mvalue.is_string()) {
          return DataLossError(src + ": __metadata__ key " + Quote(mkey) +
                               " must have a string value, got " + Brief(mvalue));
        }
        header.metadata.emplace(mkey, mvalue.get<std::string>());
      }
      continue;
    }
    TensorInfo info;
    info.name = key;
    FTUNE_RETURN_IF_ERROR(ParseTensorEntry(key, value, source, header.data_bytes, &info));
    header.tensors.push_back(std::move(info));
  }

  // The tensors must tile the data buffer: sorted by offsets (name breaks
  // ties between empty tensors), each starts where the previous one ended.
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) {
              return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
            });
  uint64_t expected = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& t : header.tensors) {
    if (t.begin < expected) {
      return DataLossError(src + ": tensor " + Quote(t.name) + ": data_offsets " +
                           Range(t.begin, t.end) + " overlap tensor " + Quote(previous->name) +
                           " at " + Range(previous->begin, previous->end));
    }
    if (t.begin > expected) {
      return DataLossError(
          src + ": tensor " + Quote(t.name) + ": data_offsets " + Range(t.begin, t.end) +
          " leave bytes [" + std::to_string(expected) + ", " + std::to_string(t.begin) +
          ") of the data buffer unused " +
          (previous ? "after tensor " + Quote(previous->name) : std::string("at its start")));
    }
    expected = t.end;
    previous = &t;
  }
  if (expected != header.data_bytes) {
    return DataLossError(
        src + ": " + std::to_string(header.data_bytes - expected) +
        " bytes at the end of the data buffer belong to no tensor " +
        (previous ? "(the last, " + Quote(previous->name) + ", ends at " +
                        std::to_string(expected) + " of " + std::to_string(header.data_bytes) + ")"
                  : "(the header lists no tensors)"));
  }
  return header;
}

Result<ByteRange> ElementRangeToBytes(const TensorInfo& info, uint64_t elem_begin,
                                      uint64_t elem_end, std::string_view source) {
  const uint64_t n = info.num_elements();
  if (elem_begin > elem_end || elem_end > n) {
    return OutOfRangeError(std::string(source) + ": tensor " + Quote(info.name) +
                           ": element range [" + std::to_string(elem_begin) + ", " +
                           std::to_string(elem_end) + ") is not inside its " + std::to_string(n) +
                           " elements");
  }
  // elem_end <= n and n * bits fits in 64 bits (validated at parse time).
  const uint64_t bits = static_cast<uint64_t>(DtypeBits(info.dtype));
  if ((elem_begin * bits) % 8 != 0 || (elem_end * bits) % 8 != 0) {
    return InvalidArgumentError(std::string(source) + ": tensor " + Quote(info.name) +
                                ": element range [" + std::to_string(elem_begin) + ", " +
                                std::to_string(elem_end) + ") of " +
                                std::string(DtypeName(info.dtype)) +
                                " does not start and end on byte boundaries");
  }
  return ByteRange{elem_begin * bits / 8, elem_end * bits / 8};
}

// ---------------------------------------------------------------- file

SafetensorsFile::SafetensorsFile(std::string path, int fd, const uint8_t* map,
                                 uint64_t file_size, SafetensorsHeader header)
    : path_(std::move(path)),
      fd_(fd),
      map_(map),
      file_size_(file_size),
      header_(std::move(header)) {
  index_.reserve(header_.tensors.size());
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(const_cast<uint8_t*>(map_), file_size_);
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  Result<OpenedFile> opened = OpenRegularFile(path);
  if (!opened.ok()) return opened.status();
  const int fd = opened->fd;
  const uint64_t size = opened->size;
  if (size < 8) {
    ::close(fd);
    // Same message as the parser gives; mmap of an empty file would fail.
    static const uint8_t kZeros[8] = {};
    return ParseSafetensorsHeader(kZeros, size, path).status();
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) {
    const int err = errno;
    ::close(fd);
    return InternalError(path + ": mmap of " + std::to_string(size) +
                         " bytes failed: " + ErrnoMessage(err));
  }
  Result<SafetensorsHeader> header =
      ParseSafetensorsHeader(static_cast<const uint8_t*>(map), size, path);
  if (!header.ok()) {
    ::munmap(map, size);
    ::close(fd);
    return header.status();
  }
  // The header pages were read once to parse; nothing else needs them
  // resident.
  ::madvise(map, std::min<uint64_t>(size, header->data_start()), MADV_DONTNEED);
  return std::unique_ptr<SafetensorsFile>(new SafetensorsFile(
      path, fd, static_cast<const uint8_t*>(map), size, std::move(header).value()));
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  const auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

Result<const TensorInfo*> SafetensorsFile::Info(std::string_view name) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr) {
    return NotFoundError(path_ + ": tensor " + Quote(name) + " not found (file has " +
                         std::to_string(header_.tensors.size()) + " tensors)");
  }
  return info;
}

Result<ByteRange> SafetensorsFile::CheckRange(std::string_view name, uint64_t byte_begin,
                                              uint64_t byte_end,
                                              const TensorInfo** info_out) const {
  FTUNE_ASSIGN_OR_RETURN(const TensorInfo* info, Info(name));
  if (byte_begin > byte_end || byte_end > info->num_bytes()) {
    return OutOfRangeError(path_ + ": tensor " + Quote(name) + ": byte range [" +
                           std::to_string(byte_begin) + ", " + std::to_string(byte_end) +
                           ") is not inside its " + std::to_string(info->num_bytes()) + " bytes");
  }
  if (info_out != nullptr) *info_out = info;
  // Absolute file offsets.
  const uint64_t base = header_.data_start() + info->begin;
  return ByteRange{base + byte_begin, base + byte_end};
}

Result<ByteSpan> SafetensorsFile::Data(std::string_view name) const {
  FTUNE_ASSIGN_OR_RETURN(const TensorInfo* info, Info(name));
  return ByteSpan{map_ + header_.data_start() + info->begin, info->num_bytes()};
}

Result<ByteSpan> SafetensorsFile::DataRange(std::string_view name, uint64_t byte_begin,
                                            uint64_t byte_end) const {
  FTUNE_ASSIGN_OR_RETURN(ByteRange r, CheckRange(name, byte_begin, byte_end, nullptr));
  return ByteSpan{map_ + r.begin, r.end - r.begin};
}

Status SafetensorsFile::ReadRange(std::string_view name, uint64_t byte_begin, uint64_t byte_end,
                                  void* dst) const {
  FTUNE_ASSIGN_OR_RETURN(ByteRange r, CheckRange(name, byte_begin, byte_end, nullptr));
  // pread rather than memcpy from the mapping: the copy is all the caller
  // keeps, and the mapping's pages would otherwise count in this process's
  // RSS a second time (FSDP loading is bounded by per-rank RSS).
  uint8_t* out = static_cast<uint8_t*>(dst);
  uint64_t offset = r.begin;
  while (offset < r.end) {
    const size_t want = static_cast<size_t>(
        std::min<uint64_t>(r.end - offset, uint64_t{1} << 30));  // Linux caps one read
    const ssize_t got = ::pread(fd_, out, want, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      return InternalError(path_ + ": tensor " + Quote(name) + ": read at offset " +
                           std::to_string(offset) + " failed: " + ErrnoMessage(err));
    }
    if (got == 0) {
      return DataLossError(path_ + ": tensor " + Quote(name) + ": file ended at offset " +
                           std::to_string(offset) + " (truncated since it was opened?)");
    }
    out += got;
    offset += static_cast<uint64_t>(got);
  }
  return OkStatus();
}

Status SafetensorsFile::ReadElements(std::string_view name, uint64_t elem_begin,
                                     uint64_t elem_end, void* dst) const {
  FTUNE_ASSIGN_OR_RETURN(const TensorInfo* info, Info(name));
  FTUNE_ASSIGN_OR_RETURN(ByteRange r,
                                 ElementRangeToBytes(*info, elem_begin, elem_end, path_));
  return ReadRange(name, r.begin, r.end, dst);
}

Status SafetensorsFile::Read(std::string_view name, void* dst) const {
  FTUNE_ASSIGN_OR_RETURN(const TensorInfo* info, Info(name));
  return ReadRange(name, 0, info->num_bytes(), dst);
}

Status SafetensorsFile::ReleasePages(std::string_view name, uint64_t byte_begin,
                                     uint64_t byte_end) const {
  FTUNE_ASSIGN_OR_RETURN(ByteRange r, CheckRange(name, byte_begin, byte_end, nullptr));
  if (r.begin == r.end) return OkStatus();
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t first = r.begin / page * page;
  const uint64_t last = std::min<uint64_t>((r.end + page - 1) / page * page, file_size_);
  // MADV_DONTNEED on a read-only shared file mapping only unmaps: the bytes
  // are re-read from the page cache or disk on the next touch, unchanged.
  if (::madvise(const_cast<uint8_t*>(map_) + first, last - first, MADV_DONTNEED) != 0) {
    const int err = errno;
    return InternalError(path_ + ": tensor " + Quote(name) + ": madvise failed: " +
                         ErrnoMessage(err));
  }
  return OkStatus();
}

// ---------------------------------------------------------------- writer

Result<SafetensorsLayout> PlanSafetensors(const std::vector<TensorToWrite>& tensors,
                                          const std::map<std::string, std::string>& metadata) {
  SafetensorsLayout layout;
  layout.order.resize(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) layout.order[i] = i;
  std::set<std::string_view> names;
  for (const TensorToWrite& t : tensors) {
    const std::string where = "tensor " + Quote(t.name) + ": ";
    if (t.name == "__metadata__") {
      return InvalidArgumentError(where + "the name is reserved for the metadata map");
    }
    if (!names.insert(t.name).second) {
      return InvalidArgumentError(where + "appears twice in the tensors to write");
    }
    uint64_t elements = 1;
    for (uint64_t d : t.shape) {
      if (MulOverflows(elements, d, &elements)) {
        return InvalidArgumentError(where + "shape " + ShapeToString(t.shape) +
                                    " overflows 64 bits");
      }
    }
    uint64_t bits = 0;
    if (MulOverflows(elements, static_cast<uint64_t>(DtypeBits(t.dtype)), &bits) ||
        bits % 8 != 0 || bits / 8 != t.num_bytes) {
      return InvalidArgumentError(where + std::to_string(t.num_bytes) + " bytes given but " +
                                  std::string(DtypeName(t.dtype)) + " x " +
                                  ShapeToString(t.shape) + " needs " +
                                  (bits % 8 != 0 ? "a fractional number of"
                                                 : std::to_string(bits / 8)) +
                                  " bytes");
    }
    if (t.data == nullptr && t.num_bytes > 0) {
      return InvalidArgumentError(where + "data is null");
    }
  }
  // Widest alignment first, then by name: every tensor then starts at a
  // multiple of its element size (the header is padded to 8).
  std::stable_sort(layout.order.begin(), layout.order.end(), [&](size_t a, size_t b) {
    const TensorToWrite& x = tensors[a];
    const TensorToWrite& y = tensors[b];
    if (x.dtype != y.dtype) return x.dtype > y.dtype;
    return x.name < y.name;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  uint64_t offset = 0;
  for (size_t i : layout.order) {
    const TensorToWrite& t = tensors[i];
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = std::string(DtypeName(t.dtype));
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + t.num_bytes};
    header[t.name] = std::move(entry);
    offset += t.num_bytes;
  }
  layout.data_bytes = offset;
  std::string json;
  try {
    json = header.dump();
  } catch (const nlohmann::ordered_json::exception& e) {
    // Raised for names or metadata that are not valid UTF-8.
    return InvalidArgumentError(std::string("header cannot be written as JSON: ") + e.what());
  }
  json.append((8 - json.size() % 8) % 8, ' ');
  if (json.size() > kMaxSafetensorsHeaderBytes) {
    return InvalidArgumentError("header would be " + std::to_string(json.size()) +
                                " bytes, over the limit of " +
                                std::to_string(kMaxSafetensorsHeaderBytes));
  }
  const uint64_t n = json.size();
  layout.prefix.resize(8);
  for (int i = 0; i < 8; ++i) layout.prefix[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  layout.prefix += json;
  return layout;
}

Result<SafetensorsStream> BeginSafetensors(const std::string& path,
                                           const std::vector<TensorToWrite>& tensors,
                                           const std::map<std::string, std::string>& metadata) {
  Result<SafetensorsLayout> layout = PlanSafetensors(tensors, metadata);
  if (!layout.ok()) {
    return Status(layout.status().code(), path + ": " + layout.status().message());
  }
  SafetensorsStream stream;
  FTUNE_ASSIGN_OR_RETURN(stream.writer, AtomicFileWriter::Create(path));
  FTUNE_RETURN_IF_ERROR(stream.writer->Append(layout->prefix));
  stream.order = std::move(layout->order);
  return stream;
}

Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  FTUNE_ASSIGN_OR_RETURN(SafetensorsStream stream,
                                 BeginSafetensors(path, tensors, metadata));
  for (size_t i : stream.order) {
    // Streamed from the caller's buffers: a multi-GB checkpoint is never
    // assembled in memory.
    FTUNE_RETURN_IF_ERROR(
        stream.writer->Append(tensors[i].data, static_cast<size_t>(tensors[i].num_bytes)));
  }
  return stream.writer->Commit();
}

Result<std::string> SerializeSafetensors(const std::vector<TensorToWrite>& tensors,
                                         const std::map<std::string, std::string>& metadata) {
  FTUNE_ASSIGN_OR_RETURN(SafetensorsLayout layout, PlanSafetensors(tensors, metadata));
  std::string out = std::move(layout.prefix);
  out.reserve(out.size() + layout.data_bytes);
  for (size_t i : layout.order) {
    out.append(static_cast<const char*>(tensors[i].data),
               static_cast<size_t>(tensors[i].num_bytes));
  }
  return out;
}

// ---------------------------------------------------------------- index

Result<SafetensorsIndex> ParseSafetensorsIndex(std::string_view json, std::string_view source) {
  const std::string src(source);
  FTUNE_ASSIGN_OR_RETURN(Json j, ParseJsonNoDuplicateKeys(json, source, "index"));
  if (!j.is_object()) return DataLossError(src + ": index is not a JSON object");
  SafetensorsIndex index;
  const auto meta_it = j.find("metadata");
  if (meta_it != j.end() && !meta_it->is_null()) {
    if (!meta_it->is_object()) {
      return DataLossError(src + ": metadata must be an object, got " + Brief(*meta_it));
    }
    const auto total_it = meta_it->find("total_size");
    if (total_it != meta_it->end() && !total_it->is_null()) {
      // Some exporters write total_size as a float (e.g. 16060522496.0).
      if (total_it->is_number_unsigned()) {
        index.total_size = total_it->get<uint64_t>();
      } else if (total_it->is_number_float() && total_it->get<double>() >= 0 &&
                 total_it->get<double>() < 1.8e19 &&
                 total_it->get<double>() == static_cast<double>(static_cast<uint64_t>(
                                                total_it->get<double>()))) {
        index.total_size = static_cast<uint64_t>(total_it->get<double>());
      } else {
        return DataLossError(src + ": metadata.total_size must be a non-negative integer, got " +
                             Brief(*total_it));
      }
    }
  }
  const auto map_it = j.find("weight_map");
  if (map_it == j.end()) return DataLossError(src + ": missing \"weight_map\"");
  if (!map_it->is_object()) {
    return DataLossError(src + ": weight_map must be an object, got " + Brief(*map_it));
  }
  for (const auto& [name, file] : map_it->items()) {
    if (!file.is_string()) {
      return DataLossError(src + ": tensor " + Quote(name) +
                           ": weight_map value must be a shard file name, got " + Brief(file));
    }
    const std::string& f = file.get_ref<const std::string&>();
    // Shards live beside the index: an absolute path or a ".." component
    // would let a downloaded index read any file on the host.
    bool bad = f.empty() || f[0] == '/' || f.find('\0') != std::string::npos;
    for (size_t pos = 0; !bad && pos <= f.size();) {
      const size_t next = std::min(f.find('/', pos), f.size());
      const std::string_view part(f.data() + pos, next - pos);
      if (part == ".." || part == "." || part.empty()) bad = true;
      pos = next + 1;
    }
    if (bad) {
      return DataLossError(src + ": tensor " + Quote(name) + ": shard " + Quote(f) +
                           " must be a relative path inside the model directory");
    }
    index.weight_map.emplace(name, f);
  }
  return index;
}

// ---------------------------------------------------------------- model

Result<std::unique_ptr<SafetensorsModel>> SafetensorsModel::OpenFile(const std::string& path) {
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                                 SafetensorsFile::Open(path));
  std::unique_ptr<SafetensorsModel> model(new SafetensorsModel());
  model->source_ = path;
  for (const TensorInfo& t : file->tensors()) {
    model->tensors_.emplace(t.name, TensorRef{file.get(), &t});
  }
  model->shards_.push_back(std::move(file));
  return model;
}

Result<std::unique_ptr<SafetensorsModel>> SafetensorsModel::OpenIndex(
    const std::string& index_path) {
  // A 70B index is ~60 KB; 64 MB leaves room for any real model.
  FTUNE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path, 64u << 20));
  FTUNE_ASSIGN_OR_RETURN(SafetensorsIndex index, ParseSafetensorsIndex(text, index_path));
  const size_t slash = index_path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "" : index_path.substr(0, slash + 1);

  std::map<std::string, std::vector<const std::string*>> by_shard;
  for (const auto& [name, shard] : index.weight_map) by_shard[shard].push_back(&name);

  std::unique_ptr<SafetensorsModel> model(new SafetensorsModel());
  model->source_ = index_path;
  model->total_size_ = index.total_size;
  for (const auto& [shard, names] : by_shard) {
    Result<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(dir + shard);
    if (!file.ok()) {
      return Status(file.status().code(),
                    index_path + ": shard " + Quote(shard) + " (holding tensor " +
                        Quote(*names.front()) +
                        (names.size() > 1 ? " and " + std::to_string(names.size() - 1) + " more"
                                          : std::string()) +
                        "): " + file.status().message());
    }
    for (const std::string* name : names) {
      const TensorInfo* info = (*file)->Find(*name);
      if (info == nullptr) {
        return DataLossError(index_path + ": tensor " + Quote(*name) +
                             " is mapped to shard " + Quote(shard) + " but " + (*file)->path() +
                             " does not contain it");
      }
      model->tensors_.emplace(*name, TensorRef{file->get(), info});
    }
    model->shards_.push_back(std::move(file).value());
  }
  return model;
}

Result<std::unique_ptr<SafetensorsModel>> SafetensorsModel::OpenDirectory(const std::string& dir) {
  const std::string base = dir.empty() || dir.back() == '/' ? dir : dir + "/";
  struct stat st;
  const std::string index = base + kSafetensorsIndexName;
  if (::stat(index.c_str(), &st) == 0) return OpenIndex(index);
  const std::string single = base + kSafetensorsSingleName;
  if (::stat(single.c_str(), &st) == 0) return OpenFile(single);
  return NotFoundError(dir + ": neither " + kSafetensorsIndexName + " nor " +
                       kSafetensorsSingleName + " found");
}

std::vector<std::string> SafetensorsModel::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& [name, ref] : tensors_) names.push_back(name);
  return names;
}

Result<SafetensorsModel::TensorRef> SafetensorsModel::Find(std::string_view name) const {
  const auto it = tensors_.find(std::string(name));
  if (it == tensors_.end()) {
    return NotFoundError(source_ + ": tensor " + Quote(name) + " not found in the model (" +
                         std::to_string(tensors_.size()) + " tensors)");
  }
  return it->second;
}

Status SafetensorsModel::ReadRange(std::string_view name, uint64_t byte_begin, uint64_t byte_end,
                                   void* dst) const {
  FTUNE_ASSIGN_OR_RETURN(TensorRef ref, Find(name));
  return ref.file->ReadRange(name, byte_begin, byte_end, dst);
}

Status SafetensorsModel::ReadElements(std::string_view name, uint64_t elem_begin,
                                      uint64_t elem_end, void* dst) const {
  FTUNE_ASSIGN_OR_RETURN(TensorRef ref, Find(name));
  return ref.file->ReadElements(name, elem_begin, elem_end, dst);
}

Result<ByteSpan> SafetensorsModel::Data(std::string_view name) const {
  FTUNE_ASSIGN_OR_RETURN(TensorRef ref, Find(name));
  return ref.file->Data(name);
}

}  // namespace ftune::trainer

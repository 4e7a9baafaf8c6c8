// ftune's own safetensors reader and writer (no LibTorch).
//
// Format (the safetensors specification): u64 little-endian N, N bytes of UTF-8 JSON header,
// then the data buffer. The header maps tensor names to
// {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
// data buffer) plus an optional "__metadata__" map of strings.
//
// Validation follows what the reference implementation (the `safetensors`
// Rust crate behind the Python package, `SafeTensors::read_metadata` and
// `Metadata::validate`) rejects, so that a file we accept is one transformers
// accepts and vice versa:
//   * file shorter than 8 bytes; N > 100,000,000; 8 + N > file size;
//   * header not UTF-8 / not JSON / not an object; a tensor entry missing
//     dtype, shape or data_offsets or with values of the wrong JSON type
//     (negative or fractional numbers, data_offsets not exactly 2 numbers,
//     __metadata__ values that are not strings); unknown dtype;
//   * element count or bit size overflowing 64 bits; a sub-byte dtype (F4,
//     F6_*) whose elements do not fill whole bytes;
//   * end - begin != bytes of dtype x shape; begin > end;
//   * sorted by offsets, the tensors must tile the data buffer exactly: the
//     first starts at 0, each starts where the previous ended (no overlap, no
//     gap), and the last ends at the end of the file (no trailing bytes).
// Two checks are stricter than the crate, and say so in their message: the
// header must start with '{' (the format's spec requires it; the crate has it
// behind a TODO) and a JSON key may not appear twice in one object (the crate
// silently keeps one of the two; for a tensor name that is an ambiguity we
// refuse to guess at).
//
// Errors: Status values (worker/trainer/status.h). Every message names the
// file, and the tensor where one is involved, e.g.
//   "DATA_LOSS: /m/model.safetensors: tensor 'lm_head.weight': data_offsets
//    [0, 100] hold 100 bytes but BF16 x [128, 64] needs 16384 bytes".
//
// Reading slices (the FSDP loading path): ReadRange/ReadElements copy
// a byte range of one tensor with pread(2), so only the pages of that range
// are read from disk and none are mapped into this process; Data/DataRange
// give zero-copy views into a read-only mmap of the file, whose pages are
// faulted in only when touched, and ReleasePages drops them from this
// process's resident set again once consumed.
//
// Thread-safety: SafetensorsFile and SafetensorsModel are immutable after
// Open; every const method may be called from any number of threads at once
// (pread takes explicit offsets; ReleasePages only makes a later touch re-read
// the same bytes). A file must not be truncated while it is open: like every
// mmap reader, touching a page past the new end raises SIGBUS.
#ifndef FTUNE_WORKER_TRAINER_SAFETENSORS_H_
#define FTUNE_WORKER_TRAINER_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "ftune/file_util.h"
#include "ftune/status.h"

namespace ftune::trainer {

// Element types, in the reference implementation's order (increasing
// alignment); the writer sorts by it, so the order is part of the file layout.
enum class Dtype : uint8_t {
  kBool,
  kF4,      // MX fp4, 4 bits
  kF6E2M3,  // MX fp6, 6 bits
  kF6E3M2,  // MX fp6, 6 bits
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kF8E8M0,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kC64,  // complex of two F32
  kF64,
  kI64,
  kU64,
};

// "BF16", "F8_E4M3", ... (the header's spelling).
std::string_view DtypeName(Dtype dtype);
std::optional<Dtype> DtypeFromName(std::string_view name);
// Bits per element: 4, 6, 8, 16, 32 or 64.
int DtypeBits(Dtype dtype);

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::kU8;
  std::vector<uint64_t> shape;  // empty = scalar
  uint64_t begin = 0;           // byte offsets into the data buffer
  uint64_t end = 0;

  uint64_t num_elements() const;  // validated not to overflow
  uint64_t num_bytes() const { return end - begin; }
};

// Shape as "[128, 64]" for messages.
std::string ShapeToString(const std::vector<uint64_t>& shape);

// The 100 MB header limit of the reference implementation.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

struct SafetensorsHeader {
  uint64_t header_bytes = 0;        // N
  uint64_t data_bytes = 0;          // size of the data buffer
  std::vector<TensorInfo> tensors;  // sorted by data offset
  std::map<std::string, std::string> metadata;

  uint64_t data_start() const { return 8 + header_bytes; }
};

// Parses and validates the header of a whole safetensors file held in
// memory (file[0, file_size)). `source` names the file in error messages.
// This is the parser the fuzzer drives.
Result<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* file, uint64_t file_size,
                                                 std::string_view source);

// A non-owning view of bytes (C++17 has no std::span).
struct ByteSpan {
  const uint8_t* data = nullptr;
  uint64_t size = 0;
};

// [begin, end) in bytes of a tensor for the elements [elem_begin, elem_end).
// For sub-byte dtypes both ends must fall on byte boundaries.
struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;
};
Result<ByteRange> ElementRangeToBytes(const TensorInfo& info, uint64_t elem_begin,
                                      uint64_t elem_end, std::string_view source);

class SafetensorsFile {
 public:
  // Opens, memory-maps and validates path. A missing file is NOT_FOUND; a
  // malformed one DATA_LOSS.
  static Result<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return file_size_; }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }

  // nullptr when absent.
  const TensorInfo* Find(std::string_view name) const;
  // NOT_FOUND naming the file and the tensor when absent.
  Result<const TensorInfo*> Info(std::string_view name) const;

  // Zero-copy views into the mapping; nothing is read until touched.
  Result<ByteSpan> Data(std::string_view name) const;
  Result<ByteSpan> DataRange(std::string_view name, uint64_t byte_begin,
                             uint64_t byte_end) const;

  // Copies bytes [byte_begin, byte_end) of the tensor into dst (which must
  // hold byte_end - byte_begin bytes). OUT_OF_RANGE if the range is not
  // inside the tensor.
  Status ReadRange(std::string_view name, uint64_t byte_begin, uint64_t byte_end,
                   void* dst) const;
  // Same for elements [elem_begin, elem_end) of the row-major flattened
  // tensor: what an FSDP rank owns of a weight.
  Status ReadElements(std::string_view name, uint64_t elem_begin, uint64_t elem_end,
                      void* dst) const;
  // The whole tensor.
  Status Read(std::string_view name, void* dst) const;

  // Drops this process's mapped pages covering the byte range of the tensor
  // (rounded out to whole pages; neighbours sharing a page are re-read on
  // their next touch). Call after consuming a DataRange view.
  Status ReleasePages(std::string_view name, uint64_t byte_begin, uint64_t byte_end) const;

 private:
  SafetensorsFile(std::string path, int fd, const uint8_t* map, uint64_t file_size,
                  SafetensorsHeader header);
  Result<ByteRange> CheckRange(std::string_view name, uint64_t byte_begin,
                               uint64_t byte_end, const TensorInfo** info) const;

  std::string path_;
  int fd_ = -1;
  const uint8_t* map_ = nullptr;
  uint64_t file_size_ = 0;
  SafetensorsHeader header_;
  std::unordered_map<std::string, size_t> index_;  // name -> tensors() index
};

// Serialized form of a writer call.
struct TensorToWrite {
  std::string name;
  Dtype dtype = Dtype::kU8;
  std::vector<uint64_t> shape;
  const void* data = nullptr;  // num_bytes bytes, little-endian, row-major
  uint64_t num_bytes = 0;
};

// Builds the padded header (including the 8-byte length prefix) and the
// order in which the tensors' bytes follow it. The layout is the reference
// implementation's: tensors sorted by dtype (widest alignment first), then by
// name; JSON with "__metadata__" first (only when non-empty), compact, padded
// with spaces to a multiple of 8 bytes so every tensor is aligned to its
// element size. Same inputs give the same bytes as `safetensors.save_file`
// (up to the order of __metadata__ keys, which Python does not fix either).
struct SafetensorsLayout {
  std::string prefix;                 // 8-byte N + header JSON + padding
  std::vector<size_t> order;          // indices into the input tensors
  uint64_t data_bytes = 0;
};
Result<SafetensorsLayout> PlanSafetensors(const std::vector<TensorToWrite>& tensors,
                                          const std::map<std::string, std::string>& metadata);

// A safetensors file being written: an atomic writer that already holds
// the header; append the tensors' bytes in `order`, then Commit. For writers
// that stream bytes they generate (init-model) rather than hold.
struct SafetensorsStream {
  std::unique_ptr<AtomicFileWriter> writer;
  std::vector<size_t> order;  // indices into the tensors, as they must follow
};
// Errors are prefixed with the path.
Result<SafetensorsStream> BeginSafetensors(const std::string& path,
                                           const std::vector<TensorToWrite>& tensors,
                                           const std::map<std::string, std::string>& metadata);

// Writes a safetensors file atomically (temporary file + fsync + rename).
// INVALID_ARGUMENT for duplicate or reserved names, byte sizes that do not
// match dtype x shape, or a header over the limit.
Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata = {});
// The same bytes in memory (tests, small files).
Result<std::string> SerializeSafetensors(const std::vector<TensorToWrite>& tensors,
                                         const std::map<std::string, std::string>& metadata = {});

// model.safetensors.index.json.
struct SafetensorsIndex {
  std::map<std::string, std::string> weight_map;  // tensor name -> shard file
  std::optional<uint64_t> total_size;             // metadata.total_size
};
Result<SafetensorsIndex> ParseSafetensorsIndex(std::string_view json, std::string_view source);

inline constexpr const char kSafetensorsIndexName[] = "model.safetensors.index.json";
inline constexpr const char kSafetensorsSingleName[] = "model.safetensors";

// All tensors of a model, whether in one file or sharded.
class SafetensorsModel {
 public:
  struct TensorRef {
    const SafetensorsFile* file = nullptr;
    const TensorInfo* info = nullptr;
  };

  // A model directory: the index if present, else model.safetensors.
  static Result<std::unique_ptr<SafetensorsModel>> OpenDirectory(const std::string& dir);
  // A sharded model from its index; shard names are relative to the index's
  // directory. Every shard is opened and validated, and every tensor of the
  // weight_map must be in the shard the map names.
  static Result<std::unique_ptr<SafetensorsModel>> OpenIndex(const std::string& index_path);
  // A single-file model.
  static Result<std::unique_ptr<SafetensorsModel>> OpenFile(const std::string& path);

  // Sorted tensor names.
  std::vector<std::string> TensorNames() const;
  size_t num_tensors() const { return tensors_.size(); }
  const std::vector<std::unique_ptr<SafetensorsFile>>& shards() const { return shards_; }
  std::optional<uint64_t> index_total_size() const { return total_size_; }
  // What the model was opened from (index or file path), for messages.
  const std::string& source() const { return source_; }

  // NOT_FOUND naming the model source and the tensor when absent.
  Result<TensorRef> Find(std::string_view name) const;
  bool Contains(std::string_view name) const { return tensors_.count(std::string(name)) > 0; }

  Status ReadRange(std::string_view name, uint64_t byte_begin, uint64_t byte_end,
                   void* dst) const;
  Status ReadElements(std::string_view name, uint64_t elem_begin, uint64_t elem_end,
                      void* dst) const;
  Result<ByteSpan> Data(std::string_view name) const;

 private:
  SafetensorsModel() = default;

  std::string source_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, TensorRef> tensors_;
  std::optional<uint64_t> total_size_;
};

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_SAFETENSORS_H_

// Token files: one prepared split (train or eval) as a single binary file
// that ranks memory-map. Layout (version 1, little-endian; docs/data.md):
//
//   0    char[8]  magic "FTUNETOK"
//   8    u32      version (1)
//   12   u32      header size (128)
//   16   i64      num_rows
//   24   i64      num_tokens (sum of row lengths)
//   32   i64      max_seq_len (no row is longer)
//   40   i32      pad_token_id
//   44   u32      flags (bit 0: rows are packed documents)
//   48   u64      offset of row_offsets   (num_rows + 1) x i64, [0] = 0, last = num_tokens
//   56   u64      offset of input_ids     num_tokens x i32
//   64   u64      offset of labels        num_tokens x i32 (-100: no loss)
//   72   u64      offset of position_ids  num_tokens x i32 (0 at each document start)
//   80   u64      offset of metadata      UTF-8 JSON (tokenizer hash, template, counts, ...)
//   88   u64      metadata size in bytes
//   96   u64      file size
//   104  u8[24]   zero
// Sections start at 64-byte boundaries. Row i is tokens
// [row_offsets[i], row_offsets[i+1]).
//
// Writing is atomic: a temporary file in the same directory, fsync, rename
// over the target, fsync of the directory. A reader therefore sees either no
// file or a complete one.
//
// Thread-safety: WriteTokenFile is safe to call concurrently for different
// paths (and for the same path: the last rename wins, each file complete).
// An open TokenFile is immutable; row() may be called from many threads.
#ifndef FTUNE_WORKER_DATA_TOKEN_FILE_H_
#define FTUNE_WORKER_DATA_TOKEN_FILE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "worker/data/packing.h"
#include "ftune/status.h"

namespace ftune::data {

inline constexpr char kTokenFileMagic[8] = {'F', 'T', 'U', 'N', 'E', 'T', 'O', 'K'};
inline constexpr uint32_t kTokenFileVersion = 1;

struct TokenRow {
  const int32_t* input_ids;
  const int32_t* labels;
  const int32_t* position_ids;
  int64_t length;
};

struct TokenFileHeaderInfo {
  int64_t max_seq_len = 0;
  int32_t pad_token_id = 0;
  bool packed = false;
  std::string metadata_json = "{}";
};

// Writes `rows` to `path` atomically. Rows longer than max_seq_len, or whose
// three arrays differ in length, are an error.
Status WriteTokenFile(const std::string& path, const std::vector<Row>& rows,
                      const TokenFileHeaderInfo& info);

class TokenFile {
 public:
  // mmaps the file and checks the header and the row index; errors name the
  // file and what is wrong with it.
  static Result<std::unique_ptr<TokenFile>> Open(const std::string& path);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  int64_t num_rows() const { return num_rows_; }
  int64_t num_tokens() const { return num_tokens_; }
  // Row i, 0 <= i < num_rows(); pointers stay valid while the file is open.
  TokenRow row(int64_t i) const;
  int64_t max_seq_len() const { return max_seq_len_; }
  int32_t pad_token_id() const { return pad_token_id_; }
  bool packed() const { return packed_; }
  std::string_view metadata_json() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  TokenFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  int64_t num_rows_ = 0, num_tokens_ = 0, max_seq_len_ = 0;
  int32_t pad_token_id_ = 0;
  bool packed_ = false;
  const int64_t* row_offsets_ = nullptr;
  const int32_t* input_ids_ = nullptr;
  const int32_t* labels_ = nullptr;
  const int32_t* position_ids_ = nullptr;
  std::string_view metadata_;
};

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_TOKEN_FILE_H_

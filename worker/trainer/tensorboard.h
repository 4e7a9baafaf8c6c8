// TensorBoard event files: rank 0's training scalars where HF's Trainer
// puts them with report_to=["tensorboard"], so `tensorboard --logdir
// <output_dir>/runs` shows an ftune job like any other run.
//
// File format (what TensorBoard's reader expects; nothing else is written):
//   <log_dir>/events.out.tfevents.<unix seconds>.<host>
//   a sequence of TFRecord frames, each
//     uint64 length (little-endian)
//     uint32 masked CRC-32C of those 8 length bytes
//     `length` bytes of data: one serialized tensorboard.Event
//     uint32 masked CRC-32C of the data
//   where masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 and CRC-32C is
//   the Castagnoli polynomial (reflected 0x82F63B78, as iSCSI and ext4).
//   The first Event carries file_version "brain.Event:2"; each later one a
//   step, a wall time and a Summary of simple_value scalars.
//
// Every WriteScalars call is flushed to the OS, so a running TensorBoard
// sees each step as it is written and a crash loses at most the step being
// written. LibTorch-free (protobuf and the C library only).
//
// Thread-safety: a TensorBoardWriter is not thread-safe; the sink that owns
// it (events.h) serializes. The CRC functions are pure.
#ifndef FTUNE_WORKER_TRAINER_TENSORBOARD_H_
#define FTUNE_WORKER_TRAINER_TENSORBOARD_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ftune/status.h"

namespace ftune::trainer {

// CRC-32C (Castagnoli) of `data`; Crc32c("123456789") == 0xE3069283.
uint32_t Crc32c(std::string_view data);
// TFRecord's masked form of a CRC, which keeps a CRC of data that itself
// holds CRCs from being mistaken for one.
uint32_t MaskCrc32c(uint32_t crc);
// One TFRecord frame around `data` (the layout above).
std::string TfRecordFrame(std::string_view data);

// <output_dir>/runs/<run name>: HF's logging_dir layout. The job's name is
// made a single safe path component (characters other than letters, digits,
// '.', '_' and '-' become '_'); a job without one is "run".
std::string TensorBoardLogDir(const std::string& output_dir, const std::string& run_name);

struct Scalar {
  std::string tag;  // "train/loss", "eval/loss", ...
  double value = 0;  // written as a float, as TensorBoard stores scalars
};

class TensorBoardWriter {
 public:
  // Creates `log_dir` (and its parents) and a new event file in it named
  // after `wall_time` (seconds since the epoch) and this host, then writes
  // the file_version record. A file of that name that exists already (a
  // restart in the same second) is not touched: the new one gets a ".N"
  // suffix.
  static Result<std::unique_ptr<TensorBoardWriter>> Open(const std::string& log_dir,
                                                         double wall_time);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // One Event with these scalars at `step`, flushed.
  Status WriteScalars(int64_t step, const std::vector<Scalar>& scalars, double wall_time);

  const std::string& path() const { return path_; }

 private:
  TensorBoardWriter(std::FILE* file, std::string path) : file_(file), path_(std::move(path)) {}
  Status WriteRecord(const std::string& data);

  std::FILE* file_;
  std::string path_;
};

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_TENSORBOARD_H_

#include "worker/trainer/tensorboard.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cctype>
#include <cerrno>
#include <cmath>

#include "ftune/file_util.h"
#include "tensorboard/event.pb.h"

namespace ftune::trainer {
namespace {

// The byte-at-a-time table of the reflected Castagnoli polynomial: entry i
// is the CRC register after shifting byte i through it.
constexpr std::array<uint32_t, 256> MakeCrc32cTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int bit = 0; bit < 8; ++bit) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrc32cTable = MakeCrc32cTable();

void AppendLittleEndian(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::string HostName() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

}  // namespace

uint32_t Crc32c(std::string_view data) {
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : data) c = kCrc32cTable[(c ^ b) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t MaskCrc32c(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

std::string TfRecordFrame(std::string_view data) {
  std::string out;
  out.reserve(data.size() + 16);
  AppendLittleEndian(&out, data.size(), 8);
  AppendLittleEndian(&out, MaskCrc32c(Crc32c(out)), 4);
  out.append(data);
  AppendLittleEndian(&out, MaskCrc32c(Crc32c(data)), 4);
  return out;
}

Result<std::unique_ptr<TensorBoardWriter>> TensorBoardWriter::Open(const std::string& log_dir,
                                                                   double wall_time) {
  FTUNE_RETURN_IF_ERROR(MakeDirectories(log_dir));
  const std::string base = log_dir + "/events.out.tfevents." +
                           std::to_string(static_cast<int64_t>(std::floor(wall_time))) + "." +
                           HostName();
  std::string path = base;
  int fd = -1;
  for (int n = 1; n < 1000; ++n) {
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0 || errno != EEXIST) break;
    path = base + "." + std::to_string(n);
  }
  if (fd < 0) {
    return InternalError("cannot create TensorBoard event file " + path + ": " +
                         ErrnoMessage(errno));
  }
  std::FILE* file = ::fdopen(fd, "wb");
  if (file == nullptr) {
    const int err = errno;
    ::close(fd);
    return InternalError("cannot open TensorBoard event file " + path + ": " + ErrnoMessage(err));
  }
  std::unique_ptr<TensorBoardWriter> writer(new TensorBoardWriter(file, path));
  tensorboard::Event version;
  version.set_wall_time(wall_time);
  version.set_file_version("brain.Event:2");
  FTUNE_RETURN_IF_ERROR(writer->WriteRecord(version.SerializeAsString()));
  if (std::fflush(file) != 0) {
    return InternalError("cannot write TensorBoard event file " + path + ": " +
                         ErrnoMessage(errno));
  }
  return writer;
}

TensorBoardWriter::~TensorBoardWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

Status TensorBoardWriter::WriteRecord(const std::string& data) {
  const std::string frame = TfRecordFrame(data);
  if (std::fwrite(frame.data(), 1, frame.size(), file_) != frame.size()) {
    return InternalError("cannot write TensorBoard event file " + path_ + ": " +
                         ErrnoMessage(errno));
  }
  return OkStatus();
}

Status TensorBoardWriter::WriteScalars(int64_t step, const std::vector<Scalar>& scalars,
                                       double wall_time) {
  tensorboard::Event event;
  event.set_wall_time(wall_time);
  event.set_step(step);
  tensorboard::Summary* summary = event.mutable_summary();
  for (const Scalar& s : scalars) {
    tensorboard::Summary::Value* v = summary->add_value();
    v->set_tag(s.tag);
    v->set_simple_value(static_cast<float>(s.value));
  }
  FTUNE_RETURN_IF_ERROR(WriteRecord(event.SerializeAsString()));
  if (std::fflush(file_) != 0) {
    return InternalError("cannot write TensorBoard event file " + path_ + ": " +
                         ErrnoMessage(errno));
  }
  return OkStatus();
}

std::string TensorBoardLogDir(const std::string& output_dir, const std::string& run_name) {
  std::string name = run_name.empty() ? "run" : run_name;
  for (char& c : name) {
    const bool safe = std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
                      c == '-';
    if (!safe) c = '_';
  }
  if (name == "." || name == "..") name = "run";
  return output_dir + "/runs/" + name;
}

}  // namespace ftune::trainer

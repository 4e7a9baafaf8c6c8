// See byte_level.h.
#include "worker/data/byte_level.h"

#include <array>

#include "worker/data/utf8.h"

namespace ftune::data {
namespace {

constexpr uint32_t kMaxMapped = 0x100 + 68;  // one past the highest mapped code point

struct Tables {
  std::array<uint32_t, 256> to_cp{};
  std::array<int16_t, kMaxMapped> to_byte{};

  Tables() {
    to_byte.fill(-1);
    uint32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      to_cp[b] = printable ? static_cast<uint32_t>(b) : next++;
      to_byte[to_cp[b]] = static_cast<int16_t>(b);
    }
  }
};

const Tables& GetTables() {
  static const Tables tables;
  return tables;
}

}  // namespace

uint32_t ByteToCodePoint(uint8_t b) { return GetTables().to_cp[b]; }

int CodePointToByte(uint32_t cp) {
  return cp < kMaxMapped ? GetTables().to_byte[cp] : -1;
}

std::string BytesToByteLevel(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) AppendUtf8(ByteToCodePoint(b), &out);
  return out;
}

bool ByteLevelToBytes(std::string_view text, std::string* bytes) {
  bytes->clear();
  if (!IsValidUtf8(text)) return false;
  for (size_t i = 0; i < text.size();) {
    size_t len;
    const int b = CodePointToByte(DecodeUtf8At(text, i, &len));
    if (b < 0) return false;
    bytes->push_back(static_cast<char>(b));
    i += len;
  }
  return true;
}

}  // namespace ftune::data

// UTF-8 helpers with the exact semantics the HF tokenizers (Rust) code has,
// since ids and decoded text must match it byte for byte.
//
// Thread-safety: pure functions.
#ifndef FTUNE_WORKER_DATA_UTF8_H_
#define FTUNE_WORKER_DATA_UTF8_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace ftune::data {

// True when `text` is well-formed UTF-8 (no overlongs, surrogates or code
// points above U+10FFFF).
bool IsValidUtf8(std::string_view text);

// Appends `text` to `out` with every ill-formed sequence replaced by U+FFFD,
// one replacement per maximal subpart (Unicode's recommended practice), which
// is what Rust's String::from_utf8_lossy does; the ByteLevel decoder ends with
// exactly that call.
void AppendUtf8Lossy(std::string_view text, std::string* out);

// Decodes the code point starting at text[pos] of well-formed UTF-8 and sets
// *length to its byte length.
inline uint32_t DecodeUtf8At(std::string_view text, size_t pos, size_t* length) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data()) + pos;
  if (p[0] < 0x80) {
    *length = 1;
    return p[0];
  }
  if (p[0] < 0xE0) {
    *length = 2;
    return (uint32_t{p[0]} & 0x1F) << 6 | (p[1] & 0x3F);
  }
  if (p[0] < 0xF0) {
    *length = 3;
    return (uint32_t{p[0]} & 0x0F) << 12 | (uint32_t{p[1]} & 0x3F) << 6 | (p[2] & 0x3F);
  }
  *length = 4;
  return (uint32_t{p[0]} & 0x07) << 18 | (uint32_t{p[1]} & 0x3F) << 12 |
         (uint32_t{p[2]} & 0x3F) << 6 | (p[3] & 0x3F);
}

// Byte length of the UTF-8 sequence that starts with `lead` (1 for a stray
// continuation byte, which well-formed input never starts with).
inline size_t Utf8Length(unsigned char lead) {
  return lead < 0xC0 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}

void AppendUtf8(uint32_t code_point, std::string* out);

// Unicode's White_Space property (what Rust's char::is_whitespace and
// Oniguruma's \s test): HT..CR, space, NEL, NBSP, U+1680, U+2000..U+200A,
// U+2028, U+2029, U+202F, U+205F, U+3000.
bool IsWhiteSpace(uint32_t code_point);

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_UTF8_H_

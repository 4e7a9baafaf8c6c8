// The GPT-2 byte <-> unicode map that HF's ByteLevel pre-tokenizer and
// decoder use: printable Latin-1 bytes map to themselves, the other 68 bytes
// (controls, space, 0x7F..0xA0, 0xAD) to U+0100.. in byte order, so every
// byte string becomes a printable string (space -> 'Ġ', '\n' -> 'Ċ').
//
// The encoder does not map text through it at run time: vocab keys are
// mapped back to raw bytes once at load (the map is a bijection), so BPE runs
// on raw bytes. The decoder and the loader use it.
//
// Thread-safety: immutable tables.
#ifndef FTUNE_WORKER_DATA_BYTE_LEVEL_H_
#define FTUNE_WORKER_DATA_BYTE_LEVEL_H_

#include <cstdint>
#include <string>
#include <string_view>

namespace ftune::data {

// Code point that byte `b` maps to (U+0021..U+0143).
uint32_t ByteToCodePoint(uint8_t b);

// Byte that code point `cp` stands for, or -1 when `cp` is not in the map.
int CodePointToByte(uint32_t cp);

// Maps raw bytes to their byte-level string ("hi there" -> "hiĠthere").
std::string BytesToByteLevel(std::string_view bytes);

// Inverse of BytesToByteLevel: false (and *bytes unspecified) when `text`
// holds a character outside the map or is not valid UTF-8.
bool ByteLevelToBytes(std::string_view text, std::string* bytes);

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_BYTE_LEVEL_H_

#include "ftune/address.h"

#include <cctype>

namespace ftune {
namespace {

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

// 127.a.b.c with every part a decimal byte.
bool IsIpv4Loopback(std::string_view host) {
  int parts = 0;
  int first = -1;
  size_t i = 0;
  while (i <= host.size()) {
    size_t j = host.find('.', i);
    if (j == std::string_view::npos) j = host.size();
    const std::string_view part = host.substr(i, j - i);
    if (part.empty() || part.size() > 3) return false;
    int value = 0;
    for (char c : part) {
      if (c < '0' || c > '9') return false;
      value = value * 10 + (c - '0');
    }
    if (value > 255) return false;
    if (parts == 0) first = value;
    ++parts;
    i = j + 1;
  }
  return parts == 4 && first == 127;
}

}  // namespace

std::string AddressHost(std::string_view address) {
  for (std::string_view prefix : {"dns:///", "dns:", "ipv4:", "ipv6:"}) {
    if (StartsWith(address, prefix)) {
      address.remove_prefix(prefix.size());
      break;
    }
  }
  if (StartsWith(address, "[")) {
    const size_t close = address.find(']');
    return std::string(address.substr(1, close == std::string_view::npos ? std::string_view::npos
                                                                         : close - 1));
  }
  const size_t colon = address.find(':');
  // Two colons or more without brackets: a bare IPv6 host.
  if (colon != std::string_view::npos && address.find(':', colon + 1) == std::string_view::npos)
    return std::string(address.substr(0, colon));
  return std::string(address);
}

bool IsLoopbackAddress(std::string_view address) {
  if (StartsWith(address, "unix:") || StartsWith(address, "unix-abstract:")) return true;
  std::string host = AddressHost(address);
  for (char& c : host) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (host == "localhost" || host == "localhost.") return true;
  if (host == "::1" || host == "0:0:0:0:0:0:0:1") return true;
  return IsIpv4Loopback(host);
}

}  // namespace ftune

// Whether a gRPC address stays on this host. The coordinator, agent and CLI
// use it for one rule: credentials and plaintext may meet only where nothing
// leaves the machine (docs/security.md, "Secure by default").
//
// Accepted forms: "host:port", "[v6]:port", a bare host, and gRPC's
// "dns:///", "ipv4:", "ipv6:" prefixes; "unix:" and "unix-abstract:" sockets
// count as local. Loopback hosts are "localhost", 127.0.0.0/8 and ::1; a
// wildcard ("0.0.0.0", "[::]", ":7450") is not loopback, it listens on every
// interface.
#ifndef FTUNE_COMMON_ADDRESS_H_
#define FTUNE_COMMON_ADDRESS_H_

#include <string>
#include <string_view>

namespace ftune {

bool IsLoopbackAddress(std::string_view address);

// The host part of a "host:port" address ("[::1]:80" -> "::1"); the whole
// string when it has no port.
std::string AddressHost(std::string_view address);

}  // namespace ftune

#endif  // FTUNE_COMMON_ADDRESS_H_

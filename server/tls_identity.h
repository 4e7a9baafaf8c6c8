// A server's TLS identity (a certificate chain and its private key) read
// from PEM files named by command-line flags, checked once at its edge and
// kept as a ready OpenSSL server context.
//
// Load refuses, naming the flag and the file: a file missing or unreadable,
// a certificate file holding no PEM certificate or one that does not parse,
// a key file holding no private key, an encrypted key (nothing could type
// its passphrase), and a key that is not the certificate's. The key's bytes
// are never put in a message, and the copy read from disk is wiped once
// parsed.
//
// The context serves TLS 1.2 and 1.3 only, without renegotiation or
// compression. SSL objects made from it hold their own reference, so an
// identity replaced while connections are open stays alive until they end.
//
// Immutable once loaded; thread-safe.
#ifndef FTUNE_SERVER_TLS_IDENTITY_H_
#define FTUNE_SERVER_TLS_IDENTITY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"

typedef struct ssl_ctx_st SSL_CTX;

namespace ftune::server {

// A PEM file and the flag that named it, for the messages.
struct PemFile {
  std::string flag;  // "--metrics-tls-cert"
  std::string path;
};

class TlsIdentity {
 public:
  // `cert_chain`: the server certificate first, then any intermediates.
  static absl::StatusOr<std::shared_ptr<const TlsIdentity>> Load(const PemFile& cert_chain,
                                                                 const PemFile& key);
  ~TlsIdentity();
  TlsIdentity(const TlsIdentity&) = delete;
  TlsIdentity& operator=(const TlsIdentity&) = delete;

  // "subject CN=metrics.example, valid until Jan  1 00:00:00 2027 GMT".
  const std::string& summary() const { return summary_; }
  // Whether the certificate's notAfter has passed (clients will refuse it).
  bool expired() const;
  // The server context; new connections take it with SSL_new.
  SSL_CTX* ctx() const { return ctx_; }

 private:
  TlsIdentity() = default;
  SSL_CTX* ctx_ = nullptr;
  std::string summary_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_TLS_IDENTITY_H_

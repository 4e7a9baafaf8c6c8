// TLS for tests: self-signed certificates made with OpenSSL's C API (no
// openssl tool needed), and an HTTPS client that trusts exactly one
// certificate and checks it is for IP 127.0.0.1. Link OpenSSL::SSL.
#ifndef FTUNE_TESTS_COMMON_TLS_TEST_UTIL_H_
#define FTUNE_TESTS_COMMON_TLS_TEST_UTIL_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ftune/socket_util.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

namespace ftune::testutil {

struct KeyAndCert {
  std::string key_pem;
  std::string cert_pem;
};

inline std::string BioText(BIO* bio) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(n));
}

inline std::string KeyPem(EVP_PKEY* key, const char* passphrase = nullptr) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
  std::string pass = passphrase ? passphrase : "";
  PEM_write_bio_PrivateKey(bio.get(), key, passphrase ? EVP_aes_256_cbc() : nullptr,
                           passphrase ? reinterpret_cast<unsigned char*>(pass.data()) : nullptr,
                           static_cast<int>(pass.size()), nullptr, nullptr);
  return BioText(bio.get());
}

// A P-256 key and a self-signed certificate for IP 127.0.0.1, subject
// CN=`cn`, valid from a minute ago for a day (or until `expired_since`
// seconds ago). `passphrase` encrypts the key's PEM.
inline KeyAndCert SelfSigned(const std::string& cn, const char* passphrase = nullptr,
                             long expired_since = 0) {
  static long serial = 1;
  EVP_PKEY* key = EVP_EC_gen("P-256");
  X509* x = X509_new();
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), serial++);
  X509_gmtime_adj(X509_getm_notBefore(x), expired_since ? -2 * expired_since : -60);
  X509_gmtime_adj(X509_getm_notAfter(x), expired_since ? -expired_since : 86400);
  X509_set_pubkey(x, key);
  X509_NAME* name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(x, name);
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, x, x, nullptr, nullptr, 0);
  for (const auto& [nid, value] : std::vector<std::pair<int, const char*>>{
           {NID_basic_constraints, "critical,CA:TRUE"},
           {NID_subject_key_identifier, "hash"},
           {NID_subject_alt_name, "IP:127.0.0.1"}}) {
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &v3, nid, value);
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
  }
  X509_sign(x, key, EVP_sha256());
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
  PEM_write_bio_X509(bio.get(), x);
  KeyAndCert out{KeyPem(key, passphrase), BioText(bio.get())};
  X509_free(x);
  EVP_PKEY_free(key);
  return out;
}

// The longest base64 line of a PEM: what must never appear in a log.
inline std::string SecretLine(const std::string& pem) {
  std::string best, line;
  for (char ch : pem + "\n") {
    if (ch != '\n') {
      line += ch;
      continue;
    }
    if (line.find("-----") == std::string::npos && line.size() > best.size()) best = line;
    line.clear();
  }
  return best;
}

// One HTTPS connection to 127.0.0.1:port that trusts exactly `trusted_pem`
// and checks the certificate is for IP 127.0.0.1.
class HttpsClient {
 public:
  // A server that closes mid-handshake must fail the call, not kill the
  // test with SIGPIPE.
  HttpsClient() { std::signal(SIGPIPE, SIG_IGN); }
  ~HttpsClient() {
    if (ssl_) SSL_free(ssl_);
    if (ctx_) SSL_CTX_free(ctx_);
    if (fd_ >= 0) close(fd_);
  }
  // The TCP connection and the TLS handshake; false with error() on failure.
  bool Connect(int port, const std::string& trusted_pem) {
    ctx_ = SSL_CTX_new(TLS_client_method());
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(
        BIO_new_mem_buf(trusted_pem.data(), static_cast<int>(trusted_pem.size())), BIO_free);
    X509* trusted = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
    X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx_), trusted);
    X509_free(trusted);
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);
    X509_VERIFY_PARAM_set1_ip_asc(SSL_CTX_get0_param(ctx_), "127.0.0.1");
    fd_ = ConnectLoopback(port, std::chrono::seconds(10));
    if (fd_ < 0) {
      error_ = "connect failed";
      return false;
    }
    ssl_ = SSL_new(ctx_);
    SSL_set_fd(ssl_, fd_);
    if (SSL_connect(ssl_) != 1) {
      const long verify = SSL_get_verify_result(ssl_);
      error_ = verify != X509_V_OK ? std::string("certificate refused: ") +
                                         X509_verify_cert_error_string(verify)
                                   : "handshake failed";
      ERR_clear_error();
      return false;
    }
    return true;
  }
  // GET /metrics on the connection; the whole response, headers included,
  // once the server closes.
  std::string Get(const std::string& authorization = "") {
    std::string req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n";
    if (!authorization.empty()) req += "Authorization: " + authorization + "\r\n";
    req += "\r\n";
    if (SSL_write(ssl_, req.data(), static_cast<int>(req.size())) <= 0) return "";
    return ReadAll();
  }
  // Everything the server sends until it closes (or 10 s pass).
  std::string ReadAll() {
    std::string out;
    char buf[16384];
    int n;
    while ((n = SSL_read(ssl_, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
    ERR_clear_error();
    return out;
  }
  const std::string& error() const { return error_; }

 private:
  SSL_CTX* ctx_ = nullptr;
  SSL* ssl_ = nullptr;
  int fd_ = -1;
  std::string error_;
};

}  // namespace ftune::testutil

#endif  // FTUNE_TESTS_COMMON_TLS_TEST_UTIL_H_

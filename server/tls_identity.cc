#include "tls_identity.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <vector>

#include "absl/status/status.h"
#include "ftune/file_util.h"

namespace ftune::server {
namespace {

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using Bio = std::unique_ptr<BIO, BioFree>;
using Cert = std::unique_ptr<X509, X509Free>;
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

// OpenSSL's reason for the last failure ("no start line"), and a clean
// error queue for the next call. Never holds key material.
std::string TakeOpenSslError() {
  const unsigned long e = ERR_peek_last_error();
  ERR_clear_error();
  if (e == 0) return "unknown error";
  const char* reason = ERR_reason_error_string(e);
  return reason ? reason : "error " + std::to_string(e);
}

bool NoPemBlockLeft() {
  const unsigned long e = ERR_peek_last_error();
  return ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE;
}

std::string Where(const PemFile& f) { return f.flag + " " + f.path; }

absl::StatusOr<std::string> Read(const PemFile& f) {
  ftune::Result<std::string> text = ftune::ReadFileToString(f.path, ftune::kMaxSmallFileBytes);
  if (!text.ok()) {
    // Its message starts with the path, which Where() already gives.
    std::string why(text.status().message());
    if (why.rfind(f.path + ": ", 0) == 0) why.erase(0, f.path.size() + 2);
    return absl::InvalidArgumentError(Where(f) + ": " + why);
  }
  return std::move(*text);
}

absl::StatusOr<std::vector<Cert>> ParseChain(const PemFile& f, const std::string& text) {
  Bio bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
  std::vector<Cert> chain;
  ERR_clear_error();
  while (Cert c{PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)})
    chain.push_back(std::move(c));
  if (!chain.empty() && NoPemBlockLeft()) {
    ERR_clear_error();
    return chain;
  }
  if (chain.empty() && NoPemBlockLeft()) {
    ERR_clear_error();
    return absl::InvalidArgumentError(Where(f) +
                                      ": holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
  }
  return absl::InvalidArgumentError(Where(f) + ": certificate " + std::to_string(chain.size() + 1) +
                                    " does not parse as PEM: " + TakeOpenSslError());
}

int NoPassphrase(char*, int, int, void* asked) {
  *static_cast<bool*>(asked) = true;
  return -1;
}

absl::StatusOr<Pkey> ParseKey(const PemFile& f, std::string* text) {
  // OpenSSL 3 reports a file without a key block as "unsupported", which
  // says less than this.
  if (text->find("PRIVATE KEY-----") == std::string::npos) {
    OPENSSL_cleanse(text->data(), text->size());
    return absl::InvalidArgumentError(
        Where(f) + ": holds no PEM private key (-----BEGIN PRIVATE KEY-----, or RSA or EC "
                   "PRIVATE KEY)");
  }
  Bio bio(BIO_new_mem_buf(text->data(), static_cast<int>(text->size())));
  bool asked = false;
  ERR_clear_error();
  Pkey key(PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, &asked));
  bio.reset();
  OPENSSL_cleanse(text->data(), text->size());
  if (key) return key;
  if (asked) {
    ERR_clear_error();
    return absl::InvalidArgumentError(
        Where(f) + ": the private key is encrypted and nothing can type its passphrase at "
                   "start: decrypt it (`openssl pkey -in KEY -out KEY.plain`) and make it "
                   "readable by the coordinator's user only");
  }
  return absl::InvalidArgumentError(Where(f) + ": the private key does not parse as PEM: " +
                                    TakeOpenSslError());
}

std::string Summary(X509* cert) {
  Bio out(BIO_new(BIO_s_mem()));
  BIO_puts(out.get(), "subject ");
  X509_NAME_print_ex(out.get(), X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  BIO_puts(out.get(), ", valid until ");
  ASN1_TIME_print(out.get(), X509_get0_notAfter(cert));
  char* data = nullptr;
  const long n = BIO_get_mem_data(out.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

}  // namespace

absl::StatusOr<std::shared_ptr<const TlsIdentity>> TlsIdentity::Load(const PemFile& cert_chain,
                                                                     const PemFile& key_file) {
  absl::StatusOr<std::string> cert_text = Read(cert_chain);
  if (!cert_text.ok()) return cert_text.status();
  absl::StatusOr<std::vector<Cert>> chain = ParseChain(cert_chain, *cert_text);
  if (!chain.ok()) return chain.status();
  absl::StatusOr<std::string> key_text = Read(key_file);
  if (!key_text.ok()) return key_text.status();
  absl::StatusOr<Pkey> key = ParseKey(key_file, &*key_text);
  if (!key.ok()) return key.status();
  X509* leaf = chain->front().get();
  if (X509_check_private_key(leaf, key->get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(Where(key_file) + ": this private key is not the one of " +
                                      Where(cert_chain) + " (" + Summary(leaf) +
                                      "): give the key the certificate was issued for");
  }

  std::shared_ptr<TlsIdentity> id(new TlsIdentity());
  id->ctx_ = SSL_CTX_new(TLS_server_method());
  if (!id->ctx_) return absl::InternalError("cannot create a TLS context: " + TakeOpenSslError());
  SSL_CTX_set_min_proto_version(id->ctx_, TLS1_2_VERSION);
  SSL_CTX_set_options(id->ctx_, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                    SSL_OP_CIPHER_SERVER_PREFERENCE);
  bool ok = SSL_CTX_use_certificate(id->ctx_, leaf) == 1 &&
            SSL_CTX_use_PrivateKey(id->ctx_, key->get()) == 1;
  for (size_t i = 1; ok && i < chain->size(); ++i)
    ok = SSL_CTX_add1_chain_cert(id->ctx_, (*chain)[i].get()) == 1;
  if (!ok || SSL_CTX_check_private_key(id->ctx_) != 1)
    return absl::InvalidArgumentError(Where(cert_chain) + " and " + Where(key_file) +
                                      ": OpenSSL refuses them for a server: " +
                                      TakeOpenSslError());
  id->summary_ = Summary(leaf);
  return std::shared_ptr<const TlsIdentity>(std::move(id));
}

TlsIdentity::~TlsIdentity() { SSL_CTX_free(ctx_); }

bool TlsIdentity::expired() const {
  X509* leaf = SSL_CTX_get0_certificate(ctx_);
  return leaf && X509_cmp_current_time(X509_get0_notAfter(leaf)) < 0;
}

}  // namespace ftune::server

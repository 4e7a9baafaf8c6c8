// What tools like grpcurl and load-balancer probes rely on: server
// reflection lists ftune's services to a caller with a user token (and to
// nobody else), and grpc.health.v1 answers SERVING without a token. Uses gRPC's generic stub with hand-encoded messages, so
// the test needs no copy of the reflection or health protos.
#include <gtest/gtest.h>
#include <grpcpp/generic/generic_stub.h>

#include "cluster.h"

namespace ftune::testing {
namespace {

grpc::ByteBuffer Bytes(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}

std::string Str(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  (void)b.Dump(&slices);
  std::string out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

bool Next(grpc::CompletionQueue* cq) {
  void* tag = nullptr;
  bool ok = false;
  return cq->Next(&tag, &ok) && ok;
}

TEST(GrpcSurface, HealthAnswersServingWithoutToken) {
  Cluster c;
  c.StartCoordinator();
  grpc::GenericStub stub(c.Channel());
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;  // deliberately no token
  // HealthCheckRequest{service: ""} is the empty message.
  auto call = stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", Bytes(""), &cq);
  call->StartCall();
  grpc::ByteBuffer resp;
  grpc::Status st;
  call->Finish(&resp, &st, reinterpret_cast<void*>(1));
  ASSERT_TRUE(Next(&cq));
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(Str(resp), std::string("\x08\x01", 2));  // status: SERVING
}

TEST(GrpcSurface, ReflectionListsFtuneServicesToAClient) {
  Cluster c;
  c.StartCoordinator();
  grpc::GenericStub stub(c.Channel());
  {
    grpc::CompletionQueue cq;
    grpc::ClientContext ctx;  // no token: refused
    auto call = stub.PrepareCall(
        &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
    call->StartCall(reinterpret_cast<void*>(1));
    ASSERT_TRUE(Next(&cq));
    grpc::Status st;
    call->Finish(&st, reinterpret_cast<void*>(2));
    ASSERT_TRUE(Next(&cq));
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << st.error_message();
  }
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  c.AddAuth(&ctx);
  auto call = stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                               &cq);
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(Next(&cq));
  // ServerReflectionRequest{list_services: "*"}: field 7, length-delimited.
  call->Write(Bytes(std::string("\x3a\x01*", 3)), reinterpret_cast<void*>(2));
  ASSERT_TRUE(Next(&cq));
  grpc::ByteBuffer resp;
  call->Read(&resp, reinterpret_cast<void*>(3));
  ASSERT_TRUE(Next(&cq));
  const std::string listing = Str(resp);
  EXPECT_NE(listing.find("ftune.v1.JobService"), std::string::npos);
  EXPECT_NE(listing.find("ftune.v1.AgentService"), std::string::npos);
  EXPECT_NE(listing.find("grpc.health.v1.Health"), std::string::npos);
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(Next(&cq));
  grpc::Status st;
  call->Finish(&st, reinterpret_cast<void*>(5));
  ASSERT_TRUE(Next(&cq));
  EXPECT_TRUE(st.ok()) << st.error_message();
}

}  // namespace
}  // namespace ftune::testing

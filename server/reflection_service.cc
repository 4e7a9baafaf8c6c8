#include "reflection_service.h"

#include <set>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>

#include "grpc_util.h"

namespace ftune::server {
namespace {

namespace refl = grpc::reflection::v1alpha;
using google::protobuf::DescriptorPool;
using google::protobuf::FileDescriptor;

// Adds `file` and what it imports, each once.
void AddFile(const FileDescriptor* file, std::set<std::string>* sent,
             refl::FileDescriptorResponse* out) {
  if (!sent->insert(file->name()).second) return;
  google::protobuf::FileDescriptorProto proto;
  file->CopyTo(&proto);
  out->add_file_descriptor_proto(proto.SerializeAsString());
  for (int i = 0; i < file->dependency_count(); ++i) AddFile(file->dependency(i), sent, out);
}

void NotFound(refl::ServerReflectionResponse* resp, const std::string& what) {
  resp->mutable_error_response()->set_error_code(grpc::StatusCode::NOT_FOUND);
  resp->mutable_error_response()->set_error_message(what + " not found");
}

}  // namespace

ReflectionServiceImpl::ReflectionServiceImpl(const Authenticator* auth,
                                             std::vector<std::string> services)
    : auth_(auth), services_(std::move(services)) {}

grpc::Status ReflectionServiceImpl::ServerReflectionInfo(
    grpc::ServerContext* ctx,
    grpc::ServerReaderWriter<refl::ServerReflectionResponse, refl::ServerReflectionRequest>*
        stream) {
  if (auto user = auth_->AuthenticateUser(Authorization(*ctx)); !user.ok())
    return ToGrpc(user.status());
  const DescriptorPool* pool = DescriptorPool::generated_pool();
  refl::ServerReflectionRequest req;
  while (stream->Read(&req)) {
    std::set<std::string> sent;  // per answer, as gRPC's own reflection does
    refl::ServerReflectionResponse resp;
    resp.set_valid_host(req.host());
    *resp.mutable_original_request() = req;
    switch (req.message_request_case()) {
      case refl::ServerReflectionRequest::kListServices:
        for (const auto& name : services_)
          resp.mutable_list_services_response()->add_service()->set_name(name);
        break;
      case refl::ServerReflectionRequest::kFileByFilename:
        if (const FileDescriptor* f = pool->FindFileByName(req.file_by_filename()))
          AddFile(f, &sent, resp.mutable_file_descriptor_response());
        else
          NotFound(&resp, "file " + req.file_by_filename());
        break;
      case refl::ServerReflectionRequest::kFileContainingSymbol:
        if (const FileDescriptor* f = pool->FindFileContainingSymbol(req.file_containing_symbol()))
          AddFile(f, &sent, resp.mutable_file_descriptor_response());
        else
          NotFound(&resp, "symbol " + req.file_containing_symbol());
        break;
      case refl::ServerReflectionRequest::kFileContainingExtension: {
        const auto& ext = req.file_containing_extension();
        const auto* type = pool->FindMessageTypeByName(ext.containing_type());
        const auto* field = type ? pool->FindExtensionByNumber(type, ext.extension_number())
                                 : nullptr;
        if (field)
          AddFile(field->file(), &sent, resp.mutable_file_descriptor_response());
        else
          NotFound(&resp, "extension " + std::to_string(ext.extension_number()) + " of " +
                              ext.containing_type());
        break;
      }
      case refl::ServerReflectionRequest::kAllExtensionNumbersOfType: {
        const auto* type = pool->FindMessageTypeByName(req.all_extension_numbers_of_type());
        if (!type) {
          NotFound(&resp, "type " + req.all_extension_numbers_of_type());
          break;
        }
        std::vector<const google::protobuf::FieldDescriptor*> fields;
        pool->FindAllExtensions(type, &fields);
        auto* numbers = resp.mutable_all_extension_numbers_response();
        numbers->set_base_type_name(type->full_name());
        for (const auto* f : fields) numbers->add_extension_number(f->number());
        break;
      }
      default:
        resp.mutable_error_response()->set_error_code(grpc::StatusCode::UNIMPLEMENTED);
        resp.mutable_error_response()->set_error_message("unknown reflection request");
    }
    if (!stream->Write(resp)) break;
  }
  return grpc::Status::OK;
}

}  // namespace ftune::server

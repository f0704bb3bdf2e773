// A typed pgstore client for Node: stubs generated from proto/ by proto-loader-gen-types, the
// service loaded with @grpc/proto-loader, and google.rpc error details decoded with protobufjs.
import * as path from 'path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import * as protobuf from 'protobufjs';
import type { ProtoGrpcType } from './generated/eventstore';
import type { EventStoreClient } from './generated/pgstore/v1/EventStore';

export type { EventStoreClient };

const PROTO_DIR = path.resolve(__dirname, '..', '..', '..', '..', 'proto');

/** A client for the server at `addr` (host:port), plaintext, with an optional bearer token. */
export function connect(addr: string, token?: string): EventStoreClient {
  const definition = protoLoader.loadSync('pgstore/v1/eventstore.proto', {
    includeDirs: [PROTO_DIR],
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const api = grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType;
  const options: grpc.ClientOptions = {};
  if (token) {
    // Tokens over plaintext only on a trusted network (or localhost): use TLS otherwise.
    options.interceptors = [
      (opts, next) =>
        new grpc.InterceptingCall(next(opts), {
          start(metadata, listener, nextStart) {
            metadata.set('authorization', `Bearer ${token}`);
            nextStart(metadata, listener);
          },
        }),
    ];
  }
  return new api.pgstore.v1.EventStore(addr, grpc.credentials.createInsecure(), options);
}

/** Calls a unary method and returns a promise of its answer. */
export function call<Req, Res>(
  client: EventStoreClient,
  method: (req: Req, cb: (err: grpc.ServiceError | null, res?: Res) => void) => unknown,
  request: Req,
): Promise<Res> {
  return new Promise((resolve, reject) =>
    method.call(client, request, (err, res) => (err ? reject(err) : resolve(res as Res))),
  );
}

/** A google.rpc.ErrorInfo: why a call failed, as machine-readable facts. */
export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

let rpcTypes: protobuf.Root | undefined;

function googleRpc(): protobuf.Root {
  if (!rpcTypes) {
    const dir = path.dirname(require.resolve('google-proto-files/package.json'));
    const root = new protobuf.Root();
    root.resolvePath = (_origin, target) =>
      target.startsWith('google/protobuf/') ? target : path.join(dir, target);
    root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
    rpcTypes = root;
  }
  return rpcTypes;
}

/** The ErrorInfo in a failed call's status details, if the server sent one. */
export function errorInfo(err: grpc.ServiceError): ErrorInfo | undefined {
  const [bin] = err.metadata.get('grpc-status-details-bin');
  if (!bin) return undefined;
  const root = googleRpc();
  const Status = root.lookupType('google.rpc.Status');
  const Info = root.lookupType('google.rpc.ErrorInfo');
  const status = Status.decode(bin as Buffer) as unknown as {
    details: { typeUrl?: string; type_url?: string; value: Uint8Array }[];
  };
  for (const any of status.details) {
    // protobufjs names the field as the .proto file does (type_url) or in camel case.
    const typeUrl = any.type_url ?? any.typeUrl ?? '';
    if (typeUrl.endsWith('/google.rpc.ErrorInfo')) {
      return Info.toObject(Info.decode(any.value), { defaults: true }) as ErrorInfo;
    }
  }
  return undefined;
}

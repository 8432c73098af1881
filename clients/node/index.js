// Q-KVComm from Node.js: a client of SenderService (Ask, Share) and InfoService, from the same
// .proto files as the Python services, with TLS, bearer tokens, deadlines and the
// google.rpc.ErrorInfo every refusal carries.
//
//   const { connect, errorInfo } = require('qkvcomm-node-client');
//   const client = connect('localhost:50062', { ca: 'ca.crt', token: process.env.QKVCOMM_TOKEN });
//   const { text, stats } = await client.ask({ context, question, codec: 'kivi-4' }, (piece) => ...);
//   client.close();
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// The .proto files: QKVCOMM_PROTO_DIR, else the copy packed with this package (npm pack), else
// the repository's proto/ when run from a checkout.
const PROTO_DIR = [process.env.QKVCOMM_PROTO_DIR, path.join(__dirname, 'proto'), path.resolve(__dirname, '..', '..', 'proto')]
  .find((dir) => dir && fs.existsSync(path.join(dir, 'qkvcomm', 'v1', 'services.proto')));

/**
 * @typedef {object} Options
 * @property {string} [ca] CA bundle (PEM file) of the server's certificate; set, the channel speaks TLS
 * @property {string} [cert] client certificate (PEM file), for a server that requires one (mTLS)
 * @property {string} [key] the client certificate's key (PEM file)
 * @property {string} [serverName] the name the server's certificate must carry, when not the host dialled
 * @property {string} [token] bearer token ('authorization: Bearer ...'); refused in plaintext off loopback
 * @property {boolean} [insecure] send the token in plaintext to a host off loopback anyway (warned once)
 * @property {string} [tenant] tenant to act for (tokens of tenant '*' only)
 * @property {number} [timeoutS] deadline of each call in seconds (default 600)
 */

/**
 * @typedef {object} AskRequest
 * @property {string} context
 * @property {string} question
 * @property {string} [codec] a codec name (InfoService lists them); '' is the sender's default
 * @property {boolean} [facts]
 * @property {number} [max_new_tokens]
 * @property {number} [layer_ratio]
 * @property {string} [layer_method]
 * @property {string} [session] a dialogue id: the context is appended to the session's so far, and
 *   only its new tokens travel (a delta card); with a session the context may be empty
 */

// Whether a target (HOST:PORT, [V6]:PORT) stays on this host.
function isLoopback(address) {
  const host = (address.includes(':') ? address.slice(0, address.lastIndexOf(':')) : address).replace(/^\[|\]$/g, '');
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

// A bearer token never crosses the network in plaintext unless `insecure` says so.
function checkTokenTransport(address, { ca, cert, token, insecure }) {
  if (!token || ca || cert || isLoopback(address)) return;
  if (!insecure) {
    throw new Error(`refusing to send a bearer token in plaintext to ${address}: give the server's CA (--ca) ` +
      'so the channel speaks TLS, or --insecure to send it in the clear anyway');
  }
  console.warn(`warning: sending a bearer token in plaintext to ${address} (--insecure): anyone on the path can read it`);
}

function credentials({ ca, cert, key }) {
  if (!ca && !cert) return grpc.credentials.createInsecure();
  if (Boolean(cert) !== Boolean(key)) throw new Error('a client certificate needs its key, and a key its certificate');
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(ca), read(key), read(cert));
}

function loadPackage() {
  if (!PROTO_DIR) throw new Error('qkvcomm .proto files not found: set QKVCOMM_PROTO_DIR');
  const definition = protoLoader.loadSync('qkvcomm/v1/services.proto', {
    includeDirs: [PROTO_DIR], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).qkvcomm.v1;
}

// google.rpc.Status and ErrorInfo, as the services put them in 'grpc-status-details-bin'.
const RPC = protobuf.Root.fromJSON({ nested: { google: { nested: {
  rpc: { nested: {
    Status: { fields: { code: { type: 'int32', id: 1 }, message: { type: 'string', id: 2 },
      details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 } } },
    ErrorInfo: { fields: { reason: { type: 'string', id: 1 }, domain: { type: 'string', id: 2 },
      metadata: { keyType: 'string', type: 'string', id: 3 } } },
  } },
  protobuf: { nested: { Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } } } },
} } } });
const Status = RPC.lookupType('google.rpc.Status');
const ErrorInfo = RPC.lookupType('google.rpc.ErrorInfo');

/**
 * The ErrorInfo a failed call carries ({reason, domain, metadata}), or null.
 * @param {Error & {metadata?: grpc.Metadata}} err
 * @returns {{reason: string, domain: string, metadata: Object<string, string>} | null}
 */
function errorInfo(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return null;
  const detail = Status.decode(raw).details.find((d) => d.type_url.endsWith('/google.rpc.ErrorInfo'));
  return detail ? ErrorInfo.toObject(ErrorInfo.decode(detail.value)) : null;
}

class Client {
  /**
   * @param {string} address HOST:PORT of a sender
   * @param {Options} [options]
   */
  constructor(address, options = {}) {
    const pkg = loadPackage();
    // Card frames are at most 1 MiB; answers are small. Match the services' limits.
    const channelOptions = { 'grpc.max_receive_message_length': 4 * 1024 * 1024 };
    if (options.serverName) channelOptions['grpc.ssl_target_name_override'] = options.serverName;
    const creds = credentials(options);
    this.sender = new pkg.SenderService(address, creds, channelOptions);
    this.infoService = new pkg.InfoService(address, creds, channelOptions);
    this.options = { timeoutS: 600, ...options };
  }

  metadata() {
    const metadata = new grpc.Metadata();
    if (this.options.token) metadata.set('authorization', `Bearer ${this.options.token}`);
    if (this.options.tenant) metadata.set('x-qkvcomm-tenant', this.options.tenant);
    return metadata;
  }

  callOptions() {
    return { deadline: Date.now() + this.options.timeoutS * 1000 };
  }

  /**
   * Share the context, then ask; `onText` sees each piece of the answer as it streams in.
   * @param {AskRequest} request
   * @param {(piece: string) => void} [onText]
   * @returns {Promise<{text: string, stats: object}>} the answer and the handoff's stats
   */
  ask(request, onText) {
    return new Promise((resolve, reject) => {
      let text = '';
      let stats = null;
      const call = this.sender.Ask(request, this.metadata(), this.callOptions());
      call.on('data', (reply) => {
        if (reply.reply === 'text') {
          text += reply.text;
          if (onText) onText(reply.text);
        } else if (reply.reply === 'stats') {
          stats = reply.stats;
        }
      });
      call.on('error', reject);
      call.on('end', () => resolve({ text, stats }));
    });
  }

  /**
   * Hand the context over without a question.
   * @param {Omit<AskRequest, 'question' | 'max_new_tokens'>} request
   * @returns {Promise<object>} the handoff's stats
   */
  share(request) {
    return new Promise((resolve, reject) => {
      this.sender.Share(request, this.metadata(), this.callOptions(),
        (err, reply) => (err ? reject(err) : resolve(reply.stats)));
    });
  }

  /**
   * What the sender runs and offers (model, device, codecs with their bits per element, limits).
   * @returns {Promise<object>} an InfoResponse
   */
  info() {
    return new Promise((resolve, reject) => {
      this.infoService.Info({}, this.metadata(), this.callOptions(), (err, reply) => (err ? reject(err) : resolve(reply)));
    });
  }

  close() {
    this.sender.close();
    this.infoService.close();
  }
}

/**
 * A client of the sender at `address`.
 * @param {string} address
 * @param {Options} [options]
 * @returns {Client}
 */
function connect(address, options = {}) {
  checkTokenTransport(address, options);
  return new Client(address, options);
}

module.exports = { connect, Client, errorInfo, isLoopback, PROTO_DIR };

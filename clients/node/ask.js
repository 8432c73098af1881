#!/usr/bin/env node
// Ask a Q-KVComm sender a question about a context: node ask.js --sender HOST:PORT
//   (--context TEXT | --context-file PATH) --question TEXT [--codec NAME] [--max-new-tokens N] [--json]
//   [--ca PEM [--cert PEM --key PEM] [--server-name NAME]] [--token TOKEN | QKVCOMM_TOKEN=...] [--tenant T]
//   [--timeout-s SECONDS]
// The answer streams to stdout as it is generated; the handoff stats follow on stderr
// (or, with --json, one JSON object on stdout). Loads the same proto/ files as the services.
// With --ca (or --cert) the channel speaks TLS; the token travels as 'authorization: Bearer ...'.
'use strict';
const fs = require('fs');
const path = require('path');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_DIR = process.env.QKVCOMM_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto');

function credentials({ ca, cert, key }) {
  if (!ca && !cert) return grpc.credentials.createInsecure();
  if (Boolean(cert) !== Boolean(key)) throw new Error('a client certificate needs its key, and a key its certificate');
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(ca), read(key), read(cert));
}

function loadSender(address, tls) {
  const definition = protoLoader.loadSync('qkvcomm/v1/services.proto', {
    includeDirs: [PROTO_DIR], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  });
  const { SenderService } = grpc.loadPackageDefinition(definition).qkvcomm.v1;
  // Card frames are at most 1 MiB; answers are small. Match the services' limits.
  const options = { 'grpc.max_receive_message_length': 4 * 1024 * 1024 };
  if (tls.serverName) options['grpc.ssl_target_name_override'] = tls.serverName;
  return new SenderService(address, credentials(tls), options);
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

// The ErrorInfo (reason, domain, metadata) a failed call carries, or null.
function errorInfo(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return null;
  const detail = Status.decode(raw).details.find((d) => d.type_url.endsWith('/google.rpc.ErrorInfo'));
  return detail ? ErrorInfo.toObject(ErrorInfo.decode(detail.value)) : null;
}

function callMetadata(token, tenant) {
  const metadata = new grpc.Metadata();
  if (token) metadata.set('authorization', `Bearer ${token}`);
  if (tenant) metadata.set('x-qkvcomm-tenant', tenant);
  return metadata;
}

function ask(client, request, onText, metadata, timeoutS) {
  return new Promise((resolve, reject) => {
    let text = '';
    let stats = null;
    const call = client.Ask(request, metadata, { deadline: Date.now() + timeoutS * 1000 });
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

async function main() {
  const { values } = parseArgs({
    options: {
      sender: { type: 'string' }, context: { type: 'string' }, 'context-file': { type: 'string' },
      question: { type: 'string' }, codec: { type: 'string', default: '' },
      'max-new-tokens': { type: 'string', default: '0' }, json: { type: 'boolean', default: false },
      ca: { type: 'string' }, cert: { type: 'string' }, key: { type: 'string' }, 'server-name': { type: 'string' },
      token: { type: 'string', default: process.env.QKVCOMM_TOKEN || '' }, tenant: { type: 'string', default: '' },
      'timeout-s': { type: 'string', default: '600' },
    },
  });
  const context = values.context ?? (values['context-file'] && fs.readFileSync(values['context-file'], 'utf8'));
  if (!values.sender || !context || !values.question) {
    console.error('usage: ask.js --sender HOST:PORT (--context TEXT | --context-file PATH) --question TEXT [--codec NAME] [--json]');
    process.exit(2);
  }
  const client = loadSender(values.sender,
    { ca: values.ca, cert: values.cert, key: values.key, serverName: values['server-name'] });
  const request = {
    context, question: values.question, codec: values.codec,
    max_new_tokens: Number(values['max-new-tokens']),
  };
  try {
    const answer = await ask(client, request, values.json ? null : (t) => process.stdout.write(t),
      callMetadata(values.token, values.tenant), Number(values['timeout-s']));
    if (values.json) {
      console.log(JSON.stringify({ answer: answer.text.trim(), ...answer.stats }));
    } else {
      const s = answer.stats;
      process.stdout.write('\n');
      console.error(`card ${s.card_id.slice(0, 12)} codec ${s.codec}: ${s.wire_bytes} B on the wire, ` +
        `${s.compression_ratio.toFixed(2)}x vs fp16 KV, ttft ${(s.ttft_s * 1e3).toFixed(0)} ms`);
    }
  } catch (err) {
    const info = errorInfo(err);
    const why = info ? ` ${info.reason}${Object.keys(info.metadata || {}).length ? ' ' + JSON.stringify(info.metadata) : ''}` : '';
    console.error(`error: ${grpc.status[err.code] ?? err.code}${why}: ${err.details || err.message}`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();

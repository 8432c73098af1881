#!/usr/bin/env node
// Ask a Q-KVComm sender a question about a context: node ask.js --sender HOST:PORT
//   (--context TEXT | --context-file PATH) --question TEXT [--codec NAME] [--session ID] [--max-new-tokens N] [--json]
//   [--ca PEM [--cert PEM --key PEM] [--server-name NAME]] [--token TOKEN | QKVCOMM_TOKEN=...] [--tenant T] [--insecure]
//   [--timeout-s SECONDS]
// The answer streams to stdout as it is generated; the handoff stats follow on stderr
// (or, with --json, one JSON object on stdout). A command line over index.js (the library).
// With --ca (or --cert) the channel speaks TLS; the token travels as 'authorization: Bearer ...'.
// A token to a host off loopback without TLS is refused unless --insecure.
'use strict';
const fs = require('fs');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const { connect, errorInfo } = require('./index');

async function main() {
  const { values } = parseArgs({
    options: {
      sender: { type: 'string' }, context: { type: 'string' }, 'context-file': { type: 'string' },
      question: { type: 'string' }, codec: { type: 'string', default: '' }, session: { type: 'string', default: '' },
      'max-new-tokens': { type: 'string', default: '0' }, json: { type: 'boolean', default: false },
      ca: { type: 'string' }, cert: { type: 'string' }, key: { type: 'string' }, 'server-name': { type: 'string' },
      token: { type: 'string', default: process.env.QKVCOMM_TOKEN || '' }, tenant: { type: 'string', default: '' },
      'timeout-s': { type: 'string', default: '600' }, insecure: { type: 'boolean', default: false },
    },
  });
  const context = values.context ?? (values['context-file'] && fs.readFileSync(values['context-file'], 'utf8'));
  if (!values.sender || (context == null || (!context && !values.session)) || !values.question) {
    console.error('usage: ask.js --sender HOST:PORT (--context TEXT | --context-file PATH) --question TEXT [--codec NAME] [--json]');
    process.exit(2);
  }
  let client;
  try {
    client = connect(values.sender, {
      ca: values.ca, cert: values.cert, key: values.key, serverName: values['server-name'],
      token: values.token, tenant: values.tenant, timeoutS: Number(values['timeout-s']), insecure: values.insecure,
    });
  } catch (err) {
    console.error(`error: ${err.message}`);
    process.exit(2);
  }
  const request = {
    context, question: values.question, codec: values.codec, session: values.session,
    max_new_tokens: Number(values['max-new-tokens']),
  };
  try {
    const answer = await client.ask(request, values.json ? null : (t) => process.stdout.write(t));
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

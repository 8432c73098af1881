// npm pack / publish: copy the repository's .proto files into the package (proto/), so that an
// installed package does not depend on the repository layout; `--remove` (postpack) deletes the
// copy again, so that a checkout always reads the repository's own proto/.
'use strict';
const fs = require('fs');
const path = require('path');

const source = path.resolve(__dirname, '..', '..', '..', 'proto', 'qkvcomm', 'v1');
const target = path.resolve(__dirname, '..', 'proto', 'qkvcomm', 'v1');
if (process.argv.includes('--remove')) {
  fs.rmSync(path.resolve(__dirname, '..', 'proto'), { recursive: true, force: true });
  process.exit(0);
}
fs.mkdirSync(target, { recursive: true });
for (const name of fs.readdirSync(source).filter((n) => n.endsWith('.proto'))) {
  fs.copyFileSync(path.join(source, name), path.join(target, name));
}

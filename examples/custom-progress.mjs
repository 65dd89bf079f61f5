// A custom progress display: one line per 25% with throughput, on stderr.
//   npx della-merge demo --out demo && node examples/custom-progress.mjs
import { merge } from 'della-merge';

let next = 0.25;
const report = await merge('examples/della.yaml', {
  out: 'merged-progress',
  overwrite: true,
  onProgress(e) {
    const done = e.bytesDone / e.bytesTotal;
    if (e.phase === 'finish' || done < next) return;
    while (next <= done) next += 0.25;
    const rate = e.bytesDone / 1e6 / e.elapsedSeconds;
    process.stderr.write(`${(done * 100).toFixed(0).padStart(3)}%  ${e.tensorsDone}/${e.tensorsTotal} tensors  ${rate.toFixed(0)} MB/s  (last: ${e.tensor})\n`);
  },
});
console.log(`done: ${report.tensors.merged} merged, ${report.tensors.copied} copied in ${report.seconds.toFixed(2)} s -> ${report.out}`);

export { philox4x32_10, elementUniform, uniformFromWord, seedKey } from './philox.js';
export { fnv1a32, tensorId } from './fnv.js';
export { f16ToF32, f32ToF16, bf16ToF32, f32ToBf16, loadF32, storeF32, magnitudeKey, f32Bits, bitsF32 } from './dtypes.js';
export { stableRanks, magpruneQ, sparsifyDelta, breadcrumbsWindow, normScale } from './sparsify.js';
export { fuseElement } from './fuse.js';
export { referenceMergeTensor, referenceDots, expertRowOffset, type ElementProbe } from './merge-tensor.js';
export { referenceMergeRows, needsWholeTensor } from './rows.js';
export type { SparsifyContext } from './sparsify.js';
export type { FuseOptions } from './fuse.js';
export type { RowsResult } from './rows.js';
// The numeric codes the functions above and MergeTaskSpec (exported at the top level)
// take for dtypes, sparsifiers, rescales and consensus (the kernels' own), and the
// input bytes they read.
export { DTYPE_CODE, SPARSIFIER_CODE, RESCALE_CODE, CONSENSUS_CODE } from '../merge/task.js';
export type { InputBytes } from '../merge/task.js';

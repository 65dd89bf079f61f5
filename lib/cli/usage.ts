/** Help texts of the della-merge command. */
export const USAGE = `della-merge ${'{version}'}: fast DELLA / DARE / task-arithmetic merging of safetensors models

Usage:
  della-merge run RECIPE --out DIR [options]   merge the models of a recipe (YAML or JSON)
  della-merge verify OUT --recipe RECIPE       check a merged model against its recipe
  della-merge assemble --out DIR PART...       join the parts of a merge run with --part i/N
  della-merge inspect PATH [--json]            list the tensors of a checkpoint
  della-merge demo [--out DIR]                 build three small experts and merge them with DELLA
  della-merge doctor [--json]                  report the platform, binary, SIMD and CUDA status
  della-merge help [COMMAND]                   show help
  della-merge --version

Run "della-merge help run" for the merge options.`;

export const RUN_USAGE = `Usage: della-merge run RECIPE --out DIR [options]

  -o, --out DIR        output directory (must not exist, unless --overwrite)
  --seed N             random seed, an integer in [0, 2^53) (default: the recipe's, else 0)
  -j, --threads N      kernel threads (default: all cores), and verify's with --verify
                       (at most the cores)
  --shard-size SIZE    largest output shard, e.g. 2GB, 500MiB (default 5GB)
  --overwrite          replace DIR if it exists (atomically, when the merge is complete)
  --report FILE        write a JSON report (tensors, bytes, seconds, parameters, warnings)
  -q, --quiet          no progress output
  --json               print the report as JSON on stdout instead of a summary
  --part i/N           merge only part i of N byte-balanced parts (for N jobs, GPUs or
                       machines); join the N part directories with "della-merge assemble"
  --verify             after merging, verify the output (see "della-merge help verify")
  --allow-nonfinite    merge tensors holding NaN or infinity, and write results that
                       overflow the output dtype, instead of refusing them
  --device DEV         where the kernels run: cpu (default), cuda or cuda:N (the GPU
                       plugin; the same bytes as the CPU). Fails before writing anything
                       when the plugin, the driver or the GPU is missing.
  --gpu-memory SIZE    GPU memory the merge may use, e.g. 8GiB (default: the smaller of
                       16 GiB and 85% of the free memory); with --device cuda
  -n, --dry-run        print the plan (per tensor: action, dtype, shape and parameters; totals)
                       without reading a tensor or writing anything; --out is not needed;
                       the other options are checked as for a run (the GPU is not
                       opened), and --seed and --part shown`;

export const VERIFY_USAGE = `Usage: della-merge verify OUT --recipe RECIPE [--samples N] [--seed N] [--threads N] [--json]

  Checks that OUT has exactly the tensors, dtypes and shapes RECIPE plans, that every
  value is finite, that copied tensors equal the base's, and that sampled rows of every
  merged tensor (all rows of tensors up to 65,536 elements; of the others N rows, the
  first and last among them, so at least 2; default 3),
  recomputed by the reference implementation, equal the output bit for bit. Prints per
  tensor the fraction of each expert's change kept, how often its surviving changes
  agree in sign with the merged change, and the norm of the merged change against the
  expert's. Exits 1 if anything differs.

  -r, --recipe RECIPE  the recipe OUT was merged from
  --samples N          rows recomputed per merged tensor over 65,536 elements (default 3)
  --seed N             the seed of the merge (default: OUT/della_merge_run.json's, said
                       when it is not the recipe's, else the recipe's)
  -j, --threads N      worker threads for the tensors whose rows need passes over the
                       whole tensor (TIES, breadcrumbs, norm rescales; default: all
                       cores, at most 8, where there is enough such work)
  --json               print the report as JSON on stdout instead of the table`;

export const ASSEMBLE_USAGE = `Usage: della-merge assemble --out DIR [--overwrite] [--json] PART_DIR...

  Joins the N directories written by "della-merge run RECIPE --out PART_DIR --part i/N"
  (i = 1..N) into DIR: the same files, byte for byte, that one run of the whole merge
  writes. Refuses parts of different merges, a part given twice, missing parts, and
  tensors whose bytes no longer have the digest their part recorded.`;

export const INSPECT_USAGE = `Usage: della-merge inspect PATH [--json]

  PATH is a .safetensors file or a model directory (model.safetensors,
  model.safetensors.index.json, or *.safetensors shards).`;

export const DEMO_USAGE = `Usage: della-merge demo [--out DIR] [--threads N] [--device DEV] [--gpu-memory SIZE]

  Writes a small Llama-shaped base model and three experts (math, code, chat) into DIR
  (default: a new temporary directory), merges them with DELLA and shows what it did.
  DIR must be new, empty, or an earlier demo's (only its models/ and merged/).
  --device and --gpu-memory are those of "della-merge run".`;

export const DOCTOR_USAGE = `Usage: della-merge doctor [--json]

  Reports the platform, Node.js and glibc versions, which native binary is used
  (prebuilt or local build) and whether it loads, the CPU's SIMD extensions, and the
  CUDA status: whether the plugin (della_merge_cuda.so beside the binary, or
  $DELLA_CUDA_PLUGIN) is present and loads, the driver, and the GPU it finds, or the
  loader's or CUDA runtime's reason why --device cuda is unavailable; prints what to do
  when something is missing.
  Exits 1 when the native binary cannot be loaded.`;

export const HELP: Record<string, string> = {
  doctor: DOCTOR_USAGE,
  run: RUN_USAGE, verify: VERIFY_USAGE, assemble: ASSEMBLE_USAGE, inspect: INSPECT_USAGE, demo: DEMO_USAGE,
};

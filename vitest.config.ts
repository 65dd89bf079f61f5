import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    setupFiles: ['test/setup.ts'],
    // Rebuilds dist/ when lib/ is newer: the CLI tests and verify's workers run dist/.
    globalSetup: ['test/global-setup.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // The native addon and mapped files live in worker processes: forks isolate them.
    pool: 'forks',
  },
});

// Runs in every test file's process (vitest setupFiles).
import { afterAll } from 'vitest';
import { removeTempDirs } from './helpers/models.js';

afterAll(removeTempDirs);

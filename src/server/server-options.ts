/**
 * Limits and settings of one HTTP server. Every limit is configurable from `soppu serve`; the
 * defaults below are LoRAX's where LoRAX has one.
 */
import type { AccessControl } from './access-control.js';

export interface ServerOptions {
  /** Requests in flight (running or queued in the engine) before new ones get 429. LoRAX default 1024. */
  readonly maxConcurrentRequests: number;
  /** Most stop sequences per request. LoRAX default 4. */
  readonly maxStopSequences: number;
  /** Prompt tokens allowed after truncation; capped at the engine's own limit. */
  readonly maxInputTokens: number;
  /** Prompt + generated tokens allowed; capped at the engine's own limit. */
  readonly maxTotalTokens: number;
  /** Most alternatives per token (`return_k_alternatives`). */
  readonly maxAlternatives: number;
  /** Largest adapter upload (tar or tar.gz) in bytes. */
  readonly maxUploadBytes: number;
  /** Largest JSON body in bytes. */
  readonly maxBodyBytes: number;
  /** Directories that `adapter_source=local` paths and admin path registrations must resolve inside. */
  readonly adapterDirs: readonly string[];
  /** Where uploaded adapter archives are unpacked (one folder per upload). */
  readonly uploadDir: string;
  /** Keys file contents; null → no authentication (every caller is an admin; bind loopback). */
  readonly accessControl: AccessControl | null;
  /** SIGTERM: finish running requests within this many ms, then cancel them. */
  readonly drainDeadlineMs: number;
  /** Project version reported by /info and OpenAI's system_fingerprint. */
  readonly version: string;
}

export const DEFAULT_SERVER_OPTIONS = {
  maxConcurrentRequests: 1024,
  maxStopSequences: 4,
  maxAlternatives: 10,
  maxUploadBytes: 512 * 1024 * 1024,
  maxBodyBytes: 4 * 1024 * 1024,
  drainDeadlineMs: 30_000,
  version: '0.1.0',
} as const;

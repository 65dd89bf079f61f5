export type {
  ExpertParams,
  OutDType,
  ParamScalar,
  ParamValue,
  ParseOptions,
  Recipe,
  RecipeModel,
  TensorParams,
} from './types.js';
export { brokenRecipeProblem, checkedRecipe, expectRecipe, isParsedRecipe, loadRecipe, makeResolver, parseRecipe, validateParam } from './parse.js';
export { layerCount, layerIndex, resolveTensorParams, tensorParams } from './resolve.js';

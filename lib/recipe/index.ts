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
export { checkedRecipe, expectRecipe, isParsedRecipe, loadRecipe, makeResolver, parseRecipe, validateParam } from './parse.js';
export { layerCount, layerIndex, resolveTensorParams } from './resolve.js';

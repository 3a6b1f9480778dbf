//! Compiles zoo architecture specs into candle model code.
//!
//! `zoo_macros::model!(QuickNetLab, "../specs/quicknet_lab.yaml")` reads the spec (relative to
//! the invoking crate's `Cargo.toml`) with `zoo-spec`, the same parser and validator the
//! runtime builder uses, and emits a struct with one field per layer with parameters, a `new`
//! that builds each layer from a `VarBuilder` and a `forward` that applies the layers in order.
//! The spec file is `include_str!`-ed, so editing it rebuilds the crate; a spec error becomes a
//! compile error naming the spec file, line, column and field.
//!
//! The generated code uses the `zoo` crate (`::zoo::layers`, `::zoo::spec`).

use proc_macro::TokenStream;
use proc_macro2::{Literal, Span, TokenStream as Tokens};
use quote::{format_ident, quote};
use syn::parse::{Parse, ParseStream};
use syn::{Ident, LitStr, Token};
use zoo_spec::*;

struct Input {
    name: Ident,
    path: LitStr,
}

impl Parse for Input {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let name = input.parse()?;
        input.parse::<Token![,]>()?;
        let path = input.parse()?;
        let _ = input.parse::<Option<Token![,]>>()?;
        Ok(Input { name, path })
    }
}

/// Generates a model struct from a spec file: `model!(StructName, "path/to/spec.yaml")`.
#[proc_macro]
pub fn model(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as Input);
    match generate(&input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn generate(input: &Input) -> syn::Result<Tokens> {
    let relative = input.path.value();
    let dir = std::env::var("CARGO_MANIFEST_DIR")
        .map_err(|_| syn::Error::new(input.path.span(), "CARGO_MANIFEST_DIR is not set"))?;
    let full = std::path::Path::new(&dir).join(&relative);
    let text = std::fs::read_to_string(&full).map_err(|e| {
        syn::Error::new(
            input.path.span(),
            format!("cannot read spec `{}`: {e}", full.display()),
        )
    })?;
    let spec = parse_str(&text, &relative)
        .map_err(|e| syn::Error::new(input.path.span(), format!("invalid spec: {e}")))?;
    Ok(emit(&input.name, &relative, &spec))
}

fn field(name: &str) -> Ident {
    format_ident!("{}", name.replace('.', "_"))
}

fn f64_lit(x: f64) -> Literal {
    Literal::f64_unsuffixed(x)
}

fn pair(p: [usize; 2]) -> Tokens {
    let [a, b] = p.map(Literal::usize_unsuffixed);
    quote!([#a, #b])
}

fn padding(p: Padding) -> Tokens {
    match p {
        Padding::Same => quote!(::zoo::spec::Padding::Same),
        Padding::Valid => quote!(::zoo::spec::Padding::Valid),
    }
}

fn init(i: Init) -> Tokens {
    match i {
        Init::GlorotUniform => quote!(::zoo::spec::Init::GlorotUniform),
        Init::GlorotNormal => quote!(::zoo::spec::Init::GlorotNormal),
        Init::HeNormal => quote!(::zoo::spec::Init::HeNormal),
        Init::Constant(c) => {
            let c = f64_lit(c);
            quote!(::zoo::spec::Init::Constant(#c))
        }
    }
}

fn activation(a: Activation) -> Tokens {
    match a {
        Activation::None => quote!(::zoo::spec::Activation::None),
        Activation::Sign { clip } => {
            let clip = f64_lit(clip);
            quote!(::zoo::spec::Activation::Sign { clip: #clip })
        }
        Activation::ApproxSign => quote!(::zoo::spec::Activation::ApproxSign),
        Activation::SwishSign { beta } => {
            let beta = f64_lit(beta);
            quote!(::zoo::spec::Activation::SwishSign { beta: #beta })
        }
        Activation::Lab(LabPairing::Channel) => quote!(::zoo::spec::Activation::Lab(
            ::zoo::spec::LabPairing::Channel
        )),
        Activation::Lab(LabPairing::Official) => quote!(::zoo::spec::Activation::Lab(
            ::zoo::spec::LabPairing::Official
        )),
    }
}

fn kernel_quantizer(k: KernelQuantizer) -> Tokens {
    match k {
        KernelQuantizer::None => quote!(::zoo::spec::KernelQuantizer::None),
        KernelQuantizer::SteSign { clip } => {
            let clip = f64_lit(clip);
            quote!(::zoo::spec::KernelQuantizer::SteSign { clip: #clip })
        }
        KernelQuantizer::MagnitudeAwareSign { clip } => {
            let clip = f64_lit(clip);
            quote!(::zoo::spec::KernelQuantizer::MagnitudeAwareSign { clip: #clip })
        }
        KernelQuantizer::XnorWeightScale => quote!(::zoo::spec::KernelQuantizer::XnorWeightScale),
    }
}

fn pool(p: &Pool) -> Tokens {
    let (size, stride, pad) = (pair(p.size), pair(p.stride), padding(p.padding));
    quote!(::zoo::spec::Pool { size: #size, stride: #stride, padding: #pad })
}

fn conv(c: &Conv) -> Tokens {
    let (filters, kernel, stride, pad, pad_value, bias, init, input, kq) = (
        Literal::usize_unsuffixed(c.filters),
        pair(c.kernel),
        pair(c.stride),
        padding(c.padding),
        f64_lit(c.pad_value),
        c.bias,
        init(c.init),
        activation(c.input),
        kernel_quantizer(c.kernel_quantizer),
    );
    let clip = match c.weight_clip {
        Some(w) => {
            let w = f64_lit(w);
            quote!(Some(#w))
        }
        None => quote!(None),
    };
    quote!(::zoo::spec::Conv {
        filters: #filters,
        kernel: #kernel,
        stride: #stride,
        padding: #pad,
        pad_value: #pad_value,
        bias: #bias,
        init: #init,
        input: #input,
        kernel_quantizer: #kq,
        weight_clip: #clip,
    })
}

fn depthwise_conv(d: &DepthwiseConv) -> Tokens {
    let (kernel, stride, pad, mult, bias, init) = (
        pair(d.kernel),
        pair(d.stride),
        padding(d.padding),
        Literal::usize_unsuffixed(d.multiplier),
        d.bias,
        init(d.init),
    );
    quote!(::zoo::spec::DepthwiseConv {
        kernel: #kernel,
        stride: #stride,
        padding: #pad,
        multiplier: #mult,
        bias: #bias,
        init: #init,
    })
}

fn batch_norm(b: &BatchNorm) -> Tokens {
    let (momentum, epsilon, center, scale) =
        (f64_lit(b.momentum), f64_lit(b.epsilon), b.center, b.scale);
    quote!(::zoo::spec::BatchNorm { momentum: #momentum, epsilon: #epsilon, center: #center, scale: #scale })
}

fn dense(d: &Dense) -> Tokens {
    let units = match d.units {
        Units::Classes => quote!(::zoo::spec::Units::Classes),
        Units::Fixed(n) => {
            let n = Literal::usize_unsuffixed(n);
            quote!(::zoo::spec::Units::Fixed(#n))
        }
    };
    let (bias, init) = (d.bias, init(d.init));
    quote!(::zoo::spec::Dense { units: #units, bias: #bias, init: #init })
}

/// The struct fields (name, type, constructor) and the forward statements of a model.
#[derive(Default)]
struct Emitter {
    fields: Vec<(Ident, Tokens, Tokens, String)>,
}

impl Emitter {
    fn param_layer(
        &mut self,
        node: &Node,
        ty: Tokens,
        config: Option<Tokens>,
        extra: Tokens,
    ) -> Tokens {
        let ident = field(&node.name);
        let name = &node.name;
        let args = match config {
            Some(config) => quote!(vb.pp(#name), shapes.input_of(#name), &#config #extra),
            None => quote!(vb.pp(#name), shapes.input_of(#name)),
        };
        self.fields.push((
            ident.clone(),
            ty.clone(),
            quote!(#ty::new(#args)?),
            format!(" `{name}` ({}, {})", node.op.kind(), location_text(node)),
        ));
        quote!(self.#ident)
    }

    /// Statements that transform `xs` through `nodes`.
    fn sequence(&mut self, nodes: &[Node]) -> Tokens {
        nodes.iter().map(|n| self.node(n)).collect()
    }

    /// The statement of one node: a call of its layer field for the layers with weights, of a
    /// function for the others.
    fn node(&mut self, node: &Node) -> Tokens {
        let no_args = quote!();
        match &node.op {
            Op::Conv(c) => self.layer_call(node, "QuantConv2d", Some(conv(c)), no_args),
            Op::DepthwiseConv(d) => {
                self.layer_call(node, "DepthwiseConv2d", Some(depthwise_conv(d)), no_args)
            }
            Op::BatchNorm(b) => self.layer_call(node, "BatchNorm", Some(batch_norm(b)), no_args),
            Op::PRelu(p) => {
                let alpha = f64_lit(p.alpha);
                let config = quote!(::zoo::spec::PRelu { alpha: #alpha });
                self.layer_call(node, "PRelu", Some(config), no_args)
            }
            Op::Bias => self.layer_call(node, "Bias", None, no_args),
            Op::Binarize(a) => self.layer_call(node, "Binarizer", Some(activation(*a)), no_args),
            Op::Dense(d) => {
                self.layer_call(node, "Dense", Some(dense(d)), quote!(, config.classes))
            }
            Op::Relu => quote!(let xs = ::zoo::layers::relu(&xs)?;),
            Op::MaxPool(p) => {
                let p = pool(p);
                quote!(let xs = ::zoo::layers::max_pool2d(&xs, &#p)?;)
            }
            Op::AvgPool(p) => {
                let p = pool(p);
                quote!(let xs = ::zoo::layers::avg_pool2d(&xs, &#p)?;)
            }
            Op::BlurPool(b) => {
                let stride = Literal::usize_unsuffixed(b.stride);
                quote!(let xs = ::zoo::layers::blur_pool(&xs, &::zoo::spec::BlurPool { stride: #stride })?;)
            }
            Op::GlobalAvgPool => quote!(let xs = ::zoo::layers::global_avg_pool(&xs)?;),
            Op::Flatten => quote!(let xs = ::zoo::layers::flatten(&xs)?;),
            Op::Duplicate => quote!(let xs = ::zoo::layers::duplicate(&xs)?;),
            Op::Residual(r) => {
                let shortcut = if r.shortcut.is_empty() {
                    quote!(xs.clone())
                } else {
                    let s = self.sequence(&r.shortcut);
                    quote!({ #s xs })
                };
                let body = self.sequence(&r.body);
                quote!(let xs = {
                    let shortcut = #shortcut;
                    let body = { #body xs };
                    (body + shortcut)?
                };)
            }
            Op::Concat(branches) => {
                let names: Vec<Ident> = (1..=branches.len())
                    .map(|i| format_ident!("branch{}", i))
                    .collect();
                let bodies: Vec<Tokens> = branches.iter().map(|b| self.sequence(b)).collect();
                quote!(let xs = {
                    #(let #names = { #bodies xs };)*
                    ::zoo::candle_core::Tensor::cat(&[#(#names),*], 1)?
                };)
            }
        }
    }

    /// `xs` through the layer field of `node`, of type `zoo::layers::<layer_type>` (see
    /// `param_layer`); batch norm also reads whether it trains.
    fn layer_call(
        &mut self,
        node: &Node,
        layer_type: &str,
        config: Option<Tokens>,
        extra_args: Tokens,
    ) -> Tokens {
        let layer_type = format_ident!("{layer_type}");
        let layer = self.param_layer(node, quote!(::zoo::layers::#layer_type), config, extra_args);
        let train = matches!(node.op, Op::BatchNorm(_)).then(|| quote!(, train));
        quote!(let xs = #layer.forward(&xs #train)?;)
    }
}

fn location_text(node: &Node) -> String {
    format!("line {}", node.location.line)
}

fn emit(name: &Ident, file: &str, spec: &Spec) -> Tokens {
    let mut emitter = Emitter::default();
    let body = emitter.sequence(&spec.nodes);
    let field_names: Vec<&Ident> = emitter.fields.iter().map(|f| &f.0).collect();
    let field_types: Vec<&Tokens> = emitter.fields.iter().map(|f| &f.1).collect();
    let field_ctors: Vec<&Tokens> = emitter.fields.iter().map(|f| &f.2).collect();
    let field_docs: Vec<&String> = emitter.fields.iter().map(|f| &f.3).collect();
    let registry_name = &spec.name;
    let doc = format!(
        " {}\n\n Generated by `zoo_macros::model!` from `{file}` (registry name `{}`); default input {} (HxWxC), {} classes.",
        if spec.description.is_empty() { &spec.name } else { &spec.description },
        spec.name,
        spec.input,
        spec.classes
    );
    let (h, w, c, classes) = (
        Literal::usize_unsuffixed(spec.input.height),
        Literal::usize_unsuffixed(spec.input.width),
        Literal::usize_unsuffixed(spec.input.channels),
        Literal::usize_unsuffixed(spec.classes),
    );
    let span = Span::call_site();
    let file_lit = LitStr::new(file, span);
    quote! {
        #[doc = #doc]
        pub struct #name {
            #(#[doc = #field_docs] pub #field_names: #field_types,)*
            spec: ::zoo::Spec,
            config: ::zoo::ModelConfig,
        }

        impl #name {
            /// Registry name.
            pub const NAME: &'static str = #registry_name;
            /// The spec file, as given to `model!`.
            pub const FILE: &'static str = #file_lit;
            /// The spec's YAML text.
            pub const YAML: &'static str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", #file_lit));

            /// The spec's default input shape and class count.
            pub fn default_config() -> ::zoo::ModelConfig {
                ::zoo::ModelConfig {
                    input: ::zoo::spec::InputShape { height: #h, width: #w, channels: #c },
                    classes: #classes,
                }
            }

            /// Creates or loads every layer through `vb` for `config`'s input shape and classes.
            pub fn new(vb: ::zoo::candle_nn::VarBuilder, config: &::zoo::ModelConfig) -> ::std::result::Result<Self, ::zoo::Error> {
                let spec = ::zoo::spec::parse_str(Self::YAML, Self::FILE)?;
                let shapes = ::zoo::spec::analyze(&spec, config)?;
                Ok(Self {
                    #(#field_names: #field_ctors,)*
                    spec,
                    config: *config,
                })
            }

            /// Logits (`N x classes`) for `N x C x H x W` images; `train` switches batch norm to
            /// batch statistics and updates its moving statistics.
            pub fn forward(&self, xs: &::zoo::candle_core::Tensor, train: bool) -> ::zoo::candle_core::Result<::zoo::candle_core::Tensor> {
                let xs = xs.clone();
                #body
                xs.flatten_from(1)
            }
        }

        impl ::zoo::Model for #name {
            fn forward(&self, xs: &::zoo::candle_core::Tensor, train: bool) -> ::zoo::candle_core::Result<::zoo::candle_core::Tensor> {
                #name::forward(self, xs, train)
            }

            fn spec(&self) -> &::zoo::Spec {
                &self.spec
            }

            fn config(&self) -> &::zoo::ModelConfig {
                &self.config
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate_from(yaml: &str) -> syn::Result<Tokens> {
        let dir = std::env::temp_dir().join(format!("zoo-macros-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "spec-{:x}.yaml",
            yaml.len() * 7919 + yaml.bytes().map(usize::from).sum::<usize>()
        ));
        std::fs::write(&path, yaml).unwrap();
        let input = Input {
            name: format_ident!("Tiny"),
            path: LitStr::new(path.to_str().unwrap(), Span::call_site()),
        };
        generate(&input)
    }

    const TINY: &str = "name: tiny
description: A tiny test network
input: 32x32x1
classes: 10
stem: [{conv: {filters: 8, kernel: 3, stride: 2}}, batch_norm]
stages:
  - {block: quicknet, filters: 8, blocks: 1, activation: lab}
  - {block: reactnet, filters: 16, blocks: 1}
head: [relu, global_avg_pool, dense]
";

    #[test]
    fn generated_code_is_a_plain_struct_with_one_field_per_layer() {
        let tokens = generate_from(TINY).unwrap();
        let file: syn::File = syn::parse2(tokens).expect("the generated code parses as Rust");
        let code = prettyplease::unparse(&file);
        if std::env::var_os("ZOO_SHOW_GENERATED").is_some() {
            println!("{code}");
        }
        for expected in [
            "pub struct Tiny {",
            "pub stem_conv1: ::zoo::layers::QuantConv2d,",
            "pub stage1_block1_conv: ::zoo::layers::QuantConv2d,",
            "pub stage2_block1_binarize: ::zoo::layers::Binarizer,",
            "vb.pp(\"stage1.block1.conv\")",
            "let xs = self.stem_bn1.forward(&xs, train)?;",
            "::zoo::spec::LabPairing::Channel",
            "pub const NAME: &'static str = \"tiny\";",
            "::zoo::candle_core::Tensor::cat(&[branch1, branch2], 1)?",
            "(body + shortcut)?",
        ] {
            assert!(code.contains(expected), "missing `{expected}` in:\n{code}");
        }
        // Layers without parameters are function calls, not fields.
        assert!(!code.contains("stem_relu"), "{code}");
    }

    #[test]
    fn a_bad_spec_is_a_compile_error_pointing_at_the_spec() {
        let err = generate_from(
            &TINY.replace("blocks: 1, activation: lab", "blocks: 1, activation: lbs"),
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("invalid spec: "), "{message}");
        assert!(
            message.contains(".yaml:7:") && message.contains("unknown activation binarizer `lbs`"),
            "{message}"
        );
        let err = generate_from("name: tiny\n").unwrap_err().to_string();
        assert!(err.contains("missing `input`"), "{err}");
    }
}
